"""Throughput benchmark: the project's training step and inference against the bare network and
against torchvision's ``SSD`` class around the same network, the data pipeline, and a short
Lightning fit - in one process, on one device, with one network and one synthetic batch.

Usage (``key=value`` arguments, values parsed as YAML; quote lists for the shell)::

    python -m ssd_lightning.benchmark                                   # CPU: small settings
    python -m ssd_lightning.benchmark device=cuda precision=bf16 'batch_sizes=[32,128]'
    python -m ssd_lightning.benchmark image_size=128 'batch_sizes=[2]' steps=1 warmup=1 \\
        repeats=1 'sections=[bare,step,torchvision,inference]' out=/tmp/bench.json

Options (default on CPU / on CUDA):
    device          cpu | cuda                       (cuda when available)
    batch_sizes     list of ints                     ([2] / [32, 128])
    precision       fp32 | bf16 (autocast)           (fp32 / bf16)
    channels_last   true | false | auto (= on CUDA)  (auto)
    image_size      network input S                  (300)
    steps           timed steps per repeat           (2 / 20)
    warmup          untimed steps before timing      (1 / 10)
    repeats         timed repeats, the median wins   (3 / 5)
    sections        any of bare, step, torchvision, inference, data, fit, or all   (all)
    compile         torch.compile the network for bare/step/inference (false)
    data_samples    samples timed in the data section (60 / 400)
    fit_epochs      epochs of the Lightning fit      (2 / 10)
    fit_batches     train batches per epoch, null = all (3 / null)
    fit_batch_size  data.batch_size of the fit       (the first of batch_sizes)
    fit_overrides   extra Hydra overrides for the fit, a list of strings ([])
    out             JSON path                        (outputs/benchmark/benchmark_<device>.json)
    seed            synthetic batch and init         (0)

On CUDA the JSON also lists, per step function, the source lines where one call synchronizes
the host with the device (``sync_sites``, from ``torch.cuda.set_sync_debug_mode``).

Sections (img/s = images per second, medians over ``repeats`` of ``steps`` steps, after
``warmup`` steps, with ``torch.cuda.synchronize`` around every timed region on CUDA):
    1 bare        forward + trivial loss (mean square of loc and logits) + backward + Adam:
                  the ceiling for a training step
    2 step        the project's step: forward, MultiBoxLoss (matching + hard-negative mining),
                  backward, Adam - what ``SSDLitModule.training_step`` computes
    3 torchvision ``torchvision.models.detection.ssd.SSD`` wrapping the SAME backbone and heads
                  (anchors = ours in pixels; its transform at the input size with identity
                  mean/std - our normalization stays in the backbone), training mode: its
                  SSDMatcher, its per-image loss loop, 4:1 mining (positive_fraction 0.2)
    4 inference   eval mode, no grad: bare forward vs ``SSD.detect`` (forward + decode + NMS,
                  predict thresholds 0.5 / 0.45 / top-20; run as forward under autocast +
                  ``postprocess``, which is what ``detect`` does) vs torchvision's SSD eval with
                  the same thresholds. The network is untrained and its scores saturate, so NMS
                  sees the full pre-NMS top-400 per image: the postprocess' worst case.
    5 data        the safe_crop training pipeline on the real images, one thread (= one
                  DataLoader worker): the CPU path (decode cache warm) and the GPU data path's
                  CPU side (parameters and boxes only), plus the GPU path's batched pixel work
                  on ``device`` per batch size
    6 fit         a short Lightning fit of the default recipe (trainer=gpu on CUDA, trainer=cpu
                  otherwise; weights none, no logger): steady-state train img/s (epochs after
                  the first, validation excluded) vs section 2 at the same batch size, and the
                  total wall time
The fit uses the DataModule's default data path (on CUDA: ``data.gpu_augment=auto`` = the GPU
path; ``'fit_overrides=[data.gpu_augment=false]'`` for the CPU workers). On a shared CPU the
numbers drift with the load; runs of the sections are interleaved (bare, step, torchvision,
bare, ...) so drift hits them alike, but treat CPU ratios as indicative.
About 2 minutes on an idle 2-core CPU with the defaults; ``image_size=128`` is ~4x faster.

The table printed at the end holds the ratios step/bare, torchvision/bare, step/torchvision and
detect/bare, torchvision_eval/bare, detect/torchvision_eval; the JSON holds everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ssd_lightning.core.anchors import load_preset
from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.ssd import SSD

SECTIONS = ("bare", "step", "torchvision", "inference", "data", "fit")
PREDICT = {"score_threshold": 0.5, "nms_threshold": 0.45, "top_k": 20}


# ------------------------------------------------------------------------------------------------
# options
@dataclass
class Options:
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [2])
    precision: str = "fp32"
    channels_last: bool | str = "auto"
    image_size: int = 300
    steps: int = 2
    warmup: int = 1
    repeats: int = 3
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    compile: bool = False
    data_samples: int = 60
    fit_epochs: int = 2
    fit_batches: int | None = 3
    fit_batch_size: int | None = None
    fit_overrides: list[str] = field(default_factory=list)
    out: str | None = None
    seed: int = 0
    anchors: str = "tall_skinny"


CUDA_DEFAULTS = {"batch_sizes": [32, 128], "precision": "bf16", "steps": 20, "warmup": 10,
                 "repeats": 5, "data_samples": 400, "fit_epochs": 10, "fit_batches": None}


class OptionError(ValueError):
    pass


def parse_options(argv: Sequence[str]) -> Options:
    """``key=value`` pairs (YAML values) -> Options, with device-dependent defaults."""
    parser = argparse.ArgumentParser(prog="python -m ssd_lightning.benchmark",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value, see the module docstring")
    args = parser.parse_args(list(argv))
    given: dict[str, Any] = {}
    known = {f for f in Options.__dataclass_fields__}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"benchmark argument {item!r}: expected key=value")
        if key not in known:
            raise OptionError(f"benchmark option {key!r} is unknown; allowed: {sorted(known)}")
        given[key] = yaml.safe_load(value) if value != "" else None
    device = str(given.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if device not in ("cpu", "cuda"):
        raise OptionError(f"benchmark option device={device!r}: allowed values are cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("benchmark option device=cuda, but torch.cuda.is_available() is False")
    values = {**(CUDA_DEFAULTS if device == "cuda" else {}), **given, "device": device}
    opts = Options(**values)
    if isinstance(opts.batch_sizes, int):
        opts.batch_sizes = [opts.batch_sizes]
    if isinstance(opts.sections, str):
        opts.sections = [s.strip() for s in opts.sections.split(",")]
    if opts.sections == ["all"]:
        opts.sections = list(SECTIONS)
    bad = [s for s in opts.sections if s not in SECTIONS]
    if bad:
        raise OptionError(f"benchmark option sections: {bad} unknown; allowed: {SECTIONS} or all")
    if opts.precision not in ("fp32", "bf16"):
        raise OptionError(f"benchmark option precision={opts.precision!r}: allowed fp32, bf16")
    if opts.channels_last not in (True, False, "auto"):
        raise OptionError(f"benchmark option channels_last={opts.channels_last!r}: "
                          "allowed true, false, auto")
    if opts.channels_last == "auto":
        opts.channels_last = device == "cuda"
    for key in ("steps", "repeats", "image_size", "data_samples", "fit_epochs"):
        if int(getattr(opts, key)) < 1:
            raise OptionError(f"benchmark option {key}={getattr(opts, key)}: must be >= 1")
    if opts.warmup < 0 or not opts.batch_sizes or min(opts.batch_sizes) < 1:
        raise OptionError("benchmark options: warmup must be >= 0 and batch_sizes >= 1")
    if opts.fit_batch_size is None:
        opts.fit_batch_size = opts.batch_sizes[0]
    if opts.out is None:
        opts.out = f"outputs/benchmark/benchmark_{device}.json"
    return opts


# ------------------------------------------------------------------------------------------------
# timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fns(fns: dict[str, Callable[[], Any]], images_per_call: int, device: torch.device,
             steps: int, warmup: int, repeats: int,
             before_repeat: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each function over ``repeats`` runs of ``steps`` calls, after
    ``warmup`` calls. The functions' runs are interleaved (f1, f2, f3, f1, f2, f3, ...) so that
    drifting load on a shared machine hits all of them alike; the device is synchronized before
    and after each timed run, so asynchronous CUDA work is counted where it is launched."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    per_call: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_repeat is not None:
                before_repeat()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            per_call[name].append((time.perf_counter() - t0) / steps)
    out = {}
    for name, times in per_call.items():
        med = statistics.median(times)
        out[name] = {"img_per_s": images_per_call / med, "ms_per_step": 1e3 * med,
                     "ms_per_step_all": [round(1e3 * t, 3) for t in times]}
    return out


def time_fn(fn: Callable[[], Any], images_per_call: int, device: torch.device, steps: int,
            warmup: int, repeats: int) -> dict[str, Any]:
    """``time_fns`` for one function."""
    return time_fns({"f": fn}, images_per_call, device, steps, warmup, repeats)["f"]


def sync_sites(fn: Callable[[], Any], device: torch.device) -> list[str] | None:
    """CUDA only: the source lines (file:line) where one call of ``fn`` synchronizes the host
    with the device, from ``torch.cuda.set_sync_debug_mode("warn")``."""
    if device.type != "cuda":
        return None
    import warnings

    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message)})


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b:
        return None
    return a["img_per_s"] / b["img_per_s"]


# ------------------------------------------------------------------------------------------------
# the network, the batch and torchvision's SSD around them
def build_net(opts: Options, device: torch.device) -> SSD:
    net = SSD(load_preset(opts.anchors), num_classes=2, image_size=opts.image_size,
              weights="none").to(device)
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def synthetic_batch(batch_size: int, image_size: int, seed: int, device: torch.device,
                    channels_last: bool) -> dict[str, Tensor]:
    """images (B,3,S,S) in [0,1]; 1-4 pedestrian-like (tall) boxes per image, padded to G=4:
    boxes (B,G,4) xyxy in input pixels, labels (B,G), mask (B,G); orig_sizes (B,2)."""
    gen = torch.Generator().manual_seed(seed)
    b, s, g = batch_size, float(image_size), 4
    images = torch.rand(b, 3, image_size, image_size, generator=gen)
    counts = torch.randint(1, g + 1, (b,), generator=gen)
    h = s * (0.25 + 0.6 * torch.rand(b, g, generator=gen))
    w = h * (0.3 + 0.2 * torch.rand(b, g, generator=gen))
    x0 = (s - w) * torch.rand(b, g, generator=gen)
    y0 = (s - h) * torch.rand(b, g, generator=gen)
    mask = torch.arange(g)[None] < counts[:, None]
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], -1) * mask[..., None]
    out = {"images": images, "boxes": boxes, "labels": mask.long(), "mask": mask,
           "orig_sizes": torch.full((b, 2), image_size, dtype=torch.int64)}
    out = {k: v.to(device) for k, v in out.items()}
    if channels_last:
        out["images"] = out["images"].contiguous(memory_format=torch.channels_last)
    return out


class _TVBackbone(nn.Module):
    """Our ResNet-34 trunk (with our ImageNet normalization) -> OrderedDict of the six maps."""

    def __init__(self, net: SSD):
        super().__init__()
        self.net_backbone = net.backbone
        self.register_buffer("mean", net.mean.clone(), persistent=False)
        self.register_buffer("std", net.std.clone(), persistent=False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.net_backbone((x - self.mean) / self.std)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class _TVHead(nn.Module):
    """Our heads in torchvision's SSDHead interface."""

    def __init__(self, net: SSD):
        super().__init__()
        self.heads = net.heads

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        loc, logits = self.heads(features)
        return {"bbox_regression": loc, "cls_logits": logits}


class _FixedAnchors(nn.Module):
    """torchvision's anchor-generator interface returning our anchors (N,4) xyxy in pixels."""

    def __init__(self, net: SSD):
        super().__init__()
        self.register_buffer("anchors_px", net.anchors_xyxy * net.image_size, persistent=False)

    def forward(self, image_list: Any, features: list[Tensor]) -> list[Tensor]:
        return [self.anchors_px] * image_list.tensors.shape[0]


def build_torchvision_ssd(net: SSD) -> nn.Module:
    """torchvision's SSD class sharing ``net``'s backbone and heads (same parameters)."""
    from torchvision.models.detection.ssd import SSD as TVSSD

    s = net.image_size
    return TVSSD(
        backbone=_TVBackbone(net), anchor_generator=_FixedAnchors(net), size=(s, s),
        num_classes=net.num_classes, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
        head=_TVHead(net), score_thresh=PREDICT["score_threshold"],
        nms_thresh=PREDICT["nms_threshold"], detections_per_img=PREDICT["top_k"],
        iou_thresh=0.5, topk_candidates=400, positive_fraction=0.2,  # 4:1 negatives, as ours
    ).to(net.anchors_xyxy.device)


def tv_inputs(batch: dict[str, Tensor]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images = list(batch["images"].unbind(0))
    targets = [{"boxes": b[m], "labels": lab[m]}
               for b, lab, m in zip(batch["boxes"], batch["labels"], batch["mask"], strict=True)]
    return images, targets


# ------------------------------------------------------------------------------------------------
# step functions
def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def make_bare_step(net: nn.Module, opt: torch.optim.Optimizer, batch: dict, bf16: bool):
    device = batch["images"].device

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            loc, logits = net(batch["images"])
        loss = loc.float().square().mean() + logits.float().square().mean()
        loss.backward()
        opt.step()
        return loss

    return step


def make_project_step(net: nn.Module, ssd: SSD, criterion: MultiBoxLoss,
                      opt: torch.optim.Optimizer, batch: dict, bf16: bool):
    """What SSDLitModule.training_step computes (minus logging and the finite check)."""
    device = batch["images"].device

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        images = batch["images"]
        s = images.shape[-1]
        gt_norm = batch["boxes"] / s  # (B,G,4) input pixels -> normalized
        with _autocast(device, bf16):
            loc, logits = net(images)
        out = criterion(loc, logits, gt_norm, batch["labels"], batch["mask"],
                        ssd.anchors_cxcywh, ssd.anchors_xyxy)
        out.total.backward()
        opt.step()
        return out.total

    return step


def make_tv_step(tv: nn.Module, opt: torch.optim.Optimizer, images: list[Tensor],
                 targets: list[dict], bf16: bool):
    device = images[0].device

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            losses = tv(images, targets)
        loss = sum(v.float() for v in losses.values())
        loss.backward()
        opt.step()
        return loss

    return step


def project_loss(ssd: SSD, batch: dict, bf16: bool = False) -> Tensor:
    """One forward + MultiBoxLoss on the batch (no optimizer): the value section 2 trains on."""
    with _autocast(batch["images"].device, bf16):
        loc, logits = ssd(batch["images"])
    return MultiBoxLoss()(loc, logits, batch["boxes"] / batch["images"].shape[-1],
                          batch["labels"], batch["mask"], ssd.anchors_cxcywh,
                          ssd.anchors_xyxy).total


def torchvision_loss(tv: nn.Module, batch: dict, bf16: bool = False) -> dict[str, Tensor]:
    images, targets = tv_inputs(batch)
    with _autocast(batch["images"].device, bf16):
        return tv(images, targets)


# ------------------------------------------------------------------------------------------------
# sections
def bench_training(opts: Options, device: torch.device, bs: int, log: Callable) -> dict:
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
        fns["step"] = make_project_step(net, ssd, MultiBoxLoss(),
                                        torch.optim.Adam(ssd.parameters(), lr=1e-3), batch, bf16)
    if "torchvision" in opts.sections:
        tv = build_torchvision_ssd(ssd).train()
        images, targets = tv_inputs(batch)
        fns["torchvision"] = make_tv_step(tv, torch.optim.Adam(tv.parameters(), lr=1e-3),
                                          images, targets, bf16)
    if fns:
        # all start from the same weights in every repeat (they share the network)
        res.update(time_fns(fns, bs, before_repeat=lambda: ssd.load_state_dict(init), **timing))
        for name in fns:
            res[name]["sync_sites"] = sync_sites(fns[name], device)
            res[name]["final_loss"] = float(fns[name]().detach())
            log(f"  bs {bs} train {name:12s} {res[name]['img_per_s']:9.1f} img/s")
    res["ratios"] = {
        "step/bare": _ratio(res.get("step"), res.get("bare")),
        "torchvision/bare": _ratio(res.get("torchvision"), res.get("bare")),
        "step/torchvision": _ratio(res.get("step"), res.get("torchvision")),
    }
    if "inference" in opts.sections:
        ssd.load_state_dict(init)
        res["inference"] = bench_inference(opts, ssd, net, batch, bf16, timing, log, bs)
    return res


def bench_inference(opts: Options, ssd: SSD, net: nn.Module, batch: dict, bf16: bool,
                    timing: dict, log: Callable, bs: int) -> dict:
    device = batch["images"].device
    ssd.eval()
    images, _ = tv_inputs(batch)
    tv = build_torchvision_ssd(ssd).eval()

    def bare() -> Any:
        with torch.inference_mode(), _autocast(device, bf16):
            return net(batch["images"])

    def detect() -> Any:
        from ssd_lightning.core.postprocess import postprocess

        with torch.inference_mode():
            with _autocast(device, bf16):
                loc, logits = net(batch["images"])
            return postprocess(loc, logits, ssd.anchors_cxcywh, batch["orig_sizes"], **PREDICT)

    def tv_eval() -> Any:
        with torch.inference_mode(), _autocast(device, bf16):
            return tv(images)

    res: dict[str, Any] = time_fns({"bare": bare, "detect": detect, "torchvision": tv_eval}, bs,
                                   **timing)
    res["detections_per_image"] = sum(len(d["boxes"]) for d in detect()) / bs
    res["sync_sites"] = {"detect": sync_sites(detect, device),
                         "torchvision": sync_sites(tv_eval, device)}
    res["ratios"] = {"detect/bare": _ratio(res["detect"], res["bare"]),
                     "torchvision/bare": _ratio(res["torchvision"], res["bare"]),
                     "detect/torchvision": _ratio(res["detect"], res["torchvision"])}
    for k in ("bare", "detect", "torchvision"):
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


def bench_data(opts: Options, device: torch.device, log: Callable) -> dict:
    """Per-worker (one thread) throughput of the CPU pipeline and of the GPU path's CPU side;
    the GPU path's pixel work per batch on ``device``."""
    from ssd_lightning.data.dataset import PennFudanDataset
    from ssd_lightning.data.gpu_augment import GpuAugmenter, build_plan_dataset, plan_collate
    from ssd_lightning.data.manifest import DEFAULT_ROOT
    from ssd_lightning.data.transforms import build_fallbacks, build_train_transform

    s, n = opts.image_size, opts.data_samples
    cpu = PennFudanDataset(DEFAULT_ROOT, transforms=build_train_transform(None, s),
                           fallbacks=build_fallbacks(None, s), skip_empty=True)
    cpu.preload()
    plan = build_plan_dataset(DEFAULT_ROOT, cpu.names, None, s)
    res: dict[str, Any] = {"augmentation": "safe_crop", "images": len(cpu)}
    with _threads(1):
        for key, ds in (("cpu_pipeline", cpu), ("gpu_path_cpu_side", plan)):
            torch.manual_seed(opts.seed)
            for i in range(min(10, n)):  # warm the decode cache and the code paths
                ds[i % len(ds)]
            t0 = time.perf_counter()
            for i in range(n):
                ds[i % len(ds)]
            dt = time.perf_counter() - t0
            res[key] = {"img_per_s_per_worker": n / dt, "samples": n}
            log(f"  data {key:20s} {n / dt:9.1f} img/s per worker")
    aug = GpuAugmenter(plan)
    res["gpu_path_pixels"] = {}
    for bs in opts.batch_sizes:
        torch.manual_seed(opts.seed)
        pb = plan_collate([plan[i % len(plan)] for i in range(bs)])
        pb = pb.to(device)
        aug(pb)  # builds the device store once
        r = time_fn(lambda pb=pb: aug(pb), bs, device, opts.steps, opts.warmup, opts.repeats)
        res["gpu_path_pixels"][str(bs)] = r
        log(f"  data gpu path pixels bs {bs:<4d} {r['img_per_s']:9.1f} img/s on {device.type}")
    return res


def _compose_fit_cfg(opts: Options, out_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from ssd_lightning.config import config_dir

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
        overrides += ["data.num_workers=0", "trainer.limit_val_batches=1",
                      "trainer.num_sanity_val_steps=0"]
    overrides += list(opts.fit_overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="benchmark"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out_dir)
    return cfg, overrides


def bench_fit(opts: Options, device: torch.device, log: Callable) -> dict:
    """A short Lightning fit of the default recipe, built as ``ssd_lightning.train.train`` builds
    it (plus a timing callback and without a logger)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ssd_lightning.config import instantiate_checked, validate_config
    from ssd_lightning.train import build_callbacks, build_module

    class FitTimer(Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[float, int]] = []  # (train seconds, images) per epoch
            self.val_s: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            _sync(device)
            self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += len(batch)
            if batch_idx + 1 == trainer.num_training_batches:  # sync once per epoch only
                _sync(device)
                self.epochs.append((time.perf_counter() - self.t0, self.n))

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            _sync(device)
            self.v0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            _sync(device)
            self.val_s.append(time.perf_counter() - self.v0)

    out_dir = Path(tempfile.mkdtemp(prefix="ssd_bench_fit_"))
    try:
        t_start = time.perf_counter()
        cfg, overrides = _compose_fit_cfg(opts, out_dir)
        validate_config(cfg)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = instantiate_checked(cfg.data, "data")
        module = build_module(cfg)
        timer = FitTimer()
        callbacks = [*build_callbacks(cfg, has_logger=False), timer]
        trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks, logger=False)
        t_fit = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        _sync(device)
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
    log(f"  fit: {res['train_img_per_s'] or 0:9.1f} train img/s (steady), "
        f"fit {res['fit_wall_s']:.1f} s, total {res['total_wall_s']:.1f} s")
    return res


# ------------------------------------------------------------------------------------------------
# report
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _meta(opts: Options, device: torch.device, num_anchors: int) -> dict:
    import torchvision

    meta = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_name()),
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "num_anchors": num_anchors,
        "options": asdict(opts),
    }
    return meta


def format_table(result: dict) -> str:
    def f(x: Any, fmt: str = "9.1f") -> str:
        return format(x, fmt) if isinstance(x, int | float) else f"{'-':>9s}"

    m = result["meta"]
    o = m["options"]
    lines = [f"SSD benchmark on {m['device_name']} ({m['device']}), {o['precision']}, "
             f"channels_last={o['channels_last']}, S={o['image_size']}, {m['num_anchors']} "
             f"anchors, torch {m['torch']}, median of {o['repeats']} x {o['steps']} steps"]
    lines.append(f"{'img/s':28s}" + "".join(f"{'bs ' + bs:>12s}" for bs in result["train"]))
    rows = [("1 bare fwd+bwd+Adam", ("bare",)), ("2 project step", ("step",)),
            ("3 torchvision SSD train", ("torchvision",)),
            ("  ratio 2/1", ("ratios", "step/bare")),
            ("  ratio 3/1", ("ratios", "torchvision/bare")),
            ("  ratio 2/3", ("ratios", "step/torchvision")),
            ("4 bare forward", ("inference", "bare")),
            ("4 project detect", ("inference", "detect")),
            ("4 torchvision eval", ("inference", "torchvision")),
            ("  ratio detect/bare", ("inference", "ratios", "detect/bare")),
            ("  ratio tv eval/bare", ("inference", "ratios", "torchvision/bare")),
            ("  ratio detect/tv eval", ("inference", "ratios", "detect/torchvision"))]
    for label, path in rows:
        cells = []
        for r in result["train"].values():
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, dict):
                v = v.get("img_per_s")
            cells.append(f"{f(v, '12.3f' if 'ratio' in label else '12.1f')}")
        lines.append(f"{label:28s}" + "".join(cells))
    d = result.get("data")
    if d:
        lines.append(f"5 data, CPU pipeline (safe_crop)    "
                     f"{f(d['cpu_pipeline']['img_per_s_per_worker'])} img/s per worker")
        lines.append(f"5 data, GPU path CPU side          "
                     f"{f(d['gpu_path_cpu_side']['img_per_s_per_worker'])} img/s per worker")
        for bs, r in d["gpu_path_pixels"].items():
            lines.append(f"5 data, GPU path pixels bs {bs:<6s}  {f(r['img_per_s'])} img/s "
                         f"on {m['device']}")
    fit = result.get("fit")
    if fit:
        lines.append(f"6 Lightning fit (bs {fit['batch_size']})          "
                     f"{f(fit['train_img_per_s'])} img/s train (steady), fit "
                     f"{fit['fit_wall_s']:.1f} s, total {fit['total_wall_s']:.1f} s")
        if fit.get("fit/step") is not None:
            lines.append(f"  ratio fit / project step        {f(fit['fit/step'], '9.3f')}")
    return "\n".join(lines)


def run(opts: Options, log: Callable[[str], None] = print) -> dict:
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {"train": {}}
    num_anchors = build_net(opts, torch.device("cpu")).num_anchors
    result["meta"] = _meta(opts, device, num_anchors)
    log(f"benchmark on {result['meta']['device_name']} ({device}), sections {opts.sections}")
    if any(s in opts.sections for s in ("bare", "step", "torchvision", "inference")):
        for bs in opts.batch_sizes:
            result["train"][str(bs)] = bench_training(opts, device, bs, log)
    if "data" in opts.sections:
        result["data"] = bench_data(opts, device, log)
    if "fit" in opts.sections:
        result["fit"] = bench_fit(opts, device, log)
        step = result["train"].get(str(opts.fit_batch_size), {}).get("step")
        result["fit"]["fit/step"] = (result["fit"]["train_img_per_s"] / step["img_per_s"]
                                     if step and result["fit"]["train_img_per_s"] else None)
    table = format_table(result)
    result["table"] = table
    log(table)
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        log(f"wrote {out}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
    except OptionError as e:
        print(f"benchmark: {e}", file=sys.stderr)
        sys.exit(2)
    # CPU: weights trained toward tiny outputs make denormal floats, which are 10-100x slower
    torch.set_flush_denormal(True)
    run(opts)


if __name__ == "__main__":
    main()
