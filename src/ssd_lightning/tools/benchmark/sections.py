"""The benchmark's model sections: the training steps (bare, the project's, torchvision's) and
inference (forward, ``SSD.detect``, torchvision, onnxruntime), on one network and one synthetic
batch. The data pipeline and the Lightning fit have their own modules."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.postprocess import PREDICT_DEFAULTS, postprocess
from ssd_lightning.core.ssd import SSD
from ssd_lightning.tools.benchmark.options import Options
from ssd_lightning.tools.benchmark.steps import (
    autocast,
    build_net,
    make_bare_step,
    make_project_step,
    make_tv_step,
    synthetic_batch,
)
from ssd_lightning.tools.benchmark.timing import ratio, sync_sites, time_fns
from ssd_lightning.tools.benchmark.torchvision_ssd import build_torchvision_ssd, tv_inputs
from ssd_lightning.tools.onnx_export import export_onnx
from ssd_lightning.tools.onnx_runtime import DETECTOR


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
