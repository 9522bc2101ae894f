"""The benchmark's sections: the training steps, inference, the data pipeline, a Lightning fit.
Each works on one network and one synthetic batch (the data section on the real images)."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from ssd_lightning.config.compose import compose
from ssd_lightning.config.paths import data_dir, load_option
from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.postprocess import PREDICT_DEFAULTS, postprocess
from ssd_lightning.core.ssd import SSD
from ssd_lightning.data.batch import plan_collate
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.gpu.pixels import GpuAugmenter
from ssd_lightning.data.gpu.plan import GpuPlanDataset, unplannable_steps
from ssd_lightning.data.presets import build_fallbacks, build_train_transform, needs_masks
from ssd_lightning.tools.benchmark.options import Options
from ssd_lightning.tools.benchmark.steps import (
    autocast,
    build_net,
    make_bare_step,
    make_project_step,
    make_tv_step,
    synthetic_batch,
)
from ssd_lightning.tools.benchmark.timing import ratio, sync, sync_sites, time_fn, time_fns
from ssd_lightning.tools.benchmark.torchvision_ssd import build_torchvision_ssd, tv_inputs
from ssd_lightning.tools.onnx_export import export_onnx
from ssd_lightning.tools.onnx_runtime import DETECTOR
from ssd_lightning.training.builders import build


def onnx_detector(opts: Options, log: Callable) -> tuple[Any, str]:
    """The network of the inference section exported as the ONNX detector (the same weights:
    the same seed) in an onnxruntime CPU session with torch's thread count; or None and why not."""
    missing = [m for m in ("onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"skipped: {', '.join(missing)} not installed (pip install -e '.[onnx]')"
    import onnxruntime as ort  # lazy: an optional dependency

    log("  exporting the detector to ONNX for onnxruntime ...")
    torch.manual_seed(opts.seed)
    net = build_net(opts, torch.device("cpu"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="ssd_bench_onnx_") as tmp:
        meta = export_onnx(net, {}, tmp, "bench", PREDICT_DEFAULTS, graphs=[DETECTOR])
        session = ort.InferenceSession(
            meta["files"][DETECTOR], options, providers=["CPUExecutionProvider"]
        )
    return session, f"onnxruntime {ort.__version__}, CPU, {options.intra_op_num_threads} threads"


def bench_training(
    opts: Options, device: torch.device, bs: int, log: Callable, onnx: Any = None
) -> dict:
    bf16 = opts.precision == "bf16"
    torch.manual_seed(opts.seed)
    ssd = build_net(opts, device)
    init = {k: v.clone() for k, v in ssd.state_dict().items()}
    net: nn.Module = torch.compile(ssd) if opts.compile else ssd
    batch = synthetic_batch(bs, opts.image_size, opts.seed, device, bool(opts.channels_last))
    timing = dict(steps=opts.steps, warmup=opts.warmup, repeats=opts.repeats, device=device)
    res: dict[str, Any] = {}
    ssd.train()
    fns: dict[str, Callable[[], Any]] = {}
    if "bare" in opts.sections:
        fns["bare"] = make_bare_step(net, torch.optim.Adam(ssd.parameters(), lr=1e-3), batch, bf16)
    if "step" in opts.sections:
        fns["step"] = make_project_step(
            net, MultiBoxLoss(), torch.optim.Adam(ssd.parameters(), lr=1e-3), batch, bf16
        )
    if "torchvision" in opts.sections:
        tv = build_torchvision_ssd(ssd).train()
        images, targets = tv_inputs(batch)
        fns["torchvision"] = make_tv_step(
            tv, torch.optim.Adam(tv.parameters(), lr=1e-3), images, targets, bf16
        )
    if fns:
        # all start from the same weights in every repeat (they share the network)
        res.update(time_fns(fns, bs, before_repeat=lambda: ssd.load_state_dict(init), **timing))
        for name in fns:
            res[name]["sync_sites"] = sync_sites(fns[name], device)
            res[name]["final_loss"] = float(fns[name]().detach())
            log(f"  bs {bs} train {name:12s} {res[name]['img_per_s']:9.1f} img/s")
    res["ratios"] = {
        "step/bare": ratio(res.get("step"), res.get("bare")),
        "torchvision/bare": ratio(res.get("torchvision"), res.get("bare")),
        "step/torchvision": ratio(res.get("step"), res.get("torchvision")),
    }
    if "inference" in opts.sections:
        ssd.load_state_dict(init)
        res["inference"] = bench_inference(opts, ssd, net, batch, bf16, timing, log, bs, onnx)
    return res


def bench_inference(
    opts: Options,
    ssd: SSD,
    net: nn.Module,
    batch: dict,
    bf16: bool,
    timing: dict,
    log: Callable,
    bs: int,
    onnx: Any = None,
) -> dict:
    """Bare forward, ``SSD.detect`` and torchvision's eval path on ``device``; with ``onnx`` (an
    onnxruntime session of the exported detector) also that, on the CPU, fp32."""
    device = batch["images"].device
    ssd.eval()
    images, _ = tv_inputs(batch)
    tv = build_torchvision_ssd(ssd).eval()

    def bare() -> Any:
        with torch.inference_mode(), autocast(device, bf16):
            return net(batch["images"])

    def detect() -> Any:
        with torch.inference_mode():
            with autocast(device, bf16):
                loc, logits = net(batch["images"])
            return postprocess(
                loc, logits, ssd.anchors_cxcywh, batch["orig_sizes"], **PREDICT_DEFAULTS
            )

    def tv_eval() -> Any:
        with torch.inference_mode(), autocast(device, bf16):
            return tv(images)

    fns = {"bare": bare, "detect": detect, "torchvision": tv_eval}
    if onnx is not None:
        feeds = {
            "images": batch["images"].float().cpu().contiguous().numpy(),
            "orig_sizes": batch["orig_sizes"].cpu().numpy(),
        }
        fns["onnxruntime"] = lambda: onnx.run(None, feeds)
    res: dict[str, Any] = time_fns(fns, bs, **timing)
    res["detections_per_image"] = sum(len(d["boxes"]) for d in detect()) / bs
    res["sync_sites"] = {
        "detect": sync_sites(detect, device),
        "torchvision": sync_sites(tv_eval, device),
    }
    res["ratios"] = {
        "detect/bare": ratio(res["detect"], res["bare"]),
        "torchvision/bare": ratio(res["torchvision"], res["bare"]),
        "detect/torchvision": ratio(res["detect"], res["torchvision"]),
        "onnxruntime/detect": ratio(res.get("onnxruntime"), res["detect"]),
    }
    if onnx is not None:
        res["onnxruntime"]["detections_per_image"] = len(fns["onnxruntime"]()[1]) / bs
    for k in fns:
        log(f"  bs {bs} infer {k:12s} {res[k]['img_per_s']:9.1f} img/s")
    ssd.train()
    return res


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_set(preset: dict, image_size: int) -> PennFudanDataset:
    ds = PennFudanDataset(
        data_dir() / "PennFudanPed",
        transforms=build_train_transform(preset, image_size),
        fallbacks=build_fallbacks(preset, image_size),
        skip_empty=True,
        with_masks=needs_masks(preset),
    )
    ds.preload()
    return ds


def bench_data(opts: Options, device: torch.device, log: Callable) -> dict:
    """Per-worker (one thread) throughput of the CPU pipeline and of the GPU path's CPU side - for
    a preset with ``tight_boxes`` also without them (``without_masks``: what the masks cost), the
    runs interleaved, median of ``repeats``; the GPU path's pixel work per batch on ``device``.
    A preset the GPU path cannot run (e.g. iou_crop's zoom-out) times the CPU pipeline only."""
    s, n = opts.image_size, opts.data_samples
    preset = load_option("augmentation", opts.augmentation)
    variants = {"": _train_set(preset, s)}
    if needs_masks(preset):
        variants["without_masks"] = _train_set({**preset, "tight_boxes": None}, s)
    no_gpu = unplannable_steps(variants[""].transforms)
    runs: dict[tuple[str, str], Any] = {}
    for variant, cpu in variants.items():
        runs[(variant, "cpu_pipeline")] = cpu
        if not no_gpu:
            runs[(variant, "gpu_path_cpu_side")] = GpuPlanDataset(cpu)
    seconds: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    with _threads(1):
        for ds in runs.values():
            for i in range(min(10, n)):  # warm the code paths
                ds[i % len(ds)]
        for _ in range(opts.repeats):  # interleaved, so drifting load hits every run alike
            for k, ds in runs.items():
                torch.manual_seed(opts.seed)
                t0 = time.perf_counter()
                for i in range(n):
                    ds[i % len(ds)]
                seconds[k].append(time.perf_counter() - t0)
    res: dict[str, Any] = {"augmentation": opts.augmentation, "images": len(variants[""])}
    for (variant, key), times in seconds.items():
        rate = n / statistics.median(times)
        (res.setdefault(variant, {}) if variant else res)[key] = {
            "img_per_s_per_worker": rate,
            "samples": n,
        }
        log(f"  data {key:20s} {variant:14s}{rate:9.1f} img/s per worker")
    res["gpu_path_pixels"] = {}
    if no_gpu:
        res["gpu_path"] = f"not timed: no GPU implementation of {', '.join(no_gpu)}"
        log(f"  data gpu path: {res['gpu_path']}")
        return res
    cpu = variants[""]
    plan = GpuPlanDataset(cpu)
    aug = GpuAugmenter(cpu)
    for bs in opts.batch_sizes:
        torch.manual_seed(opts.seed)
        pb = plan_collate([plan[i % len(plan)] for i in range(bs)])
        pb = pb.to(device)
        aug(pb)  # builds the device store once
        r = time_fn(lambda pb=pb: aug(pb), bs, device, opts.steps, opts.warmup, opts.repeats)
        res["gpu_path_pixels"][str(bs)] = r
        log(f"  data gpu path pixels bs {bs:<4d} {r['img_per_s']:9.1f} img/s on {device.type}")
    return res


def _compose_fit_cfg(opts: Options, out_dir: Path) -> tuple[DictConfig, list[str]]:
    cuda = opts.device == "cuda"
    overrides = [
        f"trainer={'gpu' if cuda else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if opts.precision == 'bf16' else '32-true'}",
        "logger=none",
        "model.net.weights=none",
        f"model.net.image_size={opts.image_size}",
        f"data.batch_size={opts.fit_batch_size}",
        f"trainer.max_epochs={opts.fit_epochs}",
        f"trainer.limit_train_batches={'null' if opts.fit_batches is None else opts.fit_batches}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"seed={opts.seed}",
    ]
    if not cuda:
        overrides += [
            "data.num_workers=0",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
        ]
    overrides += list(opts.fit_overrides)
    return compose("train", overrides, output_dir=str(out_dir), job_name="benchmark"), overrides


def bench_fit(opts: Options, device: torch.device, log: Callable) -> dict:
    """A short Lightning fit of the default recipe, built as ``ssd_lightning.train`` builds it
    (plus a timing callback, without a logger)."""

    class FitTimer(Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[float, int]] = []  # (train seconds, images) per epoch
            self.val_s: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += len(batch)
            if batch_idx + 1 == trainer.num_training_batches:  # sync once per epoch only
                sync(device)
                self.epochs.append((time.perf_counter() - self.t0, self.n))

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            self.v0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            sync(device)
            self.val_s.append(time.perf_counter() - self.v0)

    out_dir = Path(tempfile.mkdtemp(prefix="ssd_bench_fit_"))
    try:
        t_start = time.perf_counter()
        cfg, overrides = _compose_fit_cfg(opts, out_dir)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        timer = FitTimer()
        module, datamodule, trainer = build(cfg, extra_callbacks=[timer])
        t_fit = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        sync(device)
        t_end = time.perf_counter()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    steady = timer.epochs[1:] or timer.epochs
    secs = sum(t for t, _ in steady)
    imgs = sum(n for _, n in steady)
    res = {
        "overrides": overrides,
        "batch_size": opts.fit_batch_size,
        "epochs": len(timer.epochs),
        "train_img_per_s": imgs / secs if secs > 0 else None,
        "first_epoch_s": timer.epochs[0][0] if timer.epochs else None,
        "train_s_per_epoch": [round(t, 3) for t, _ in timer.epochs],
        "val_s_per_epoch": [round(t, 3) for t in timer.val_s],
        "fit_wall_s": t_end - t_fit,
        "total_wall_s": t_end - t_start,
    }
    log(
        f"  fit: {res['train_img_per_s'] or 0:9.1f} train img/s (steady), "
        f"fit {res['fit_wall_s']:.1f} s, total {res['total_wall_s']:.1f} s"
    )
    return res
