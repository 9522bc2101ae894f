"""The benchmark's pieces are correct (no timing assertions): both training steps compute finite
losses on the same batch, torchvision's SSD around our network is the same detector, and the
command runs end to end on the CPU and writes the JSON report."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.postprocess import PREDICT_DEFAULTS, postprocess
from ssd_lightning.core.step import forward_with_loss
from ssd_lightning.tools.benchmark.options import OptionError, Options, parse_options
from ssd_lightning.tools.benchmark.report import run
from ssd_lightning.tools.benchmark.steps import build_net, synthetic_batch
from ssd_lightning.tools.benchmark.torchvision_ssd import build_torchvision_ssd, tv_inputs

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def project_loss(net, batch) -> torch.Tensor:
    """What the benchmark's project step trains on: the LightningModule's forward + loss."""
    keys = ("images", "boxes", "labels", "mask")
    return forward_with_loss(net, MultiBoxLoss(), *(batch[k] for k in keys))[2].total


def torchvision_loss(tv, batch) -> dict[str, torch.Tensor]:
    return tv(*tv_inputs(batch))


@pytest.fixture(scope="module")
def net_and_batch():
    opts = parse_options(["device=cpu", "image_size=128"])
    torch.manual_seed(0)
    return build_net(opts, CPU), synthetic_batch(2, 128, 0, CPU, channels_last=False)


def test_project_and_torchvision_losses_finite_on_the_same_batch(net_and_batch) -> None:
    net, batch = net_and_batch
    net.train()
    ours = project_loss(net, batch)
    tv = build_torchvision_ssd(net).train()
    theirs = torchvision_loss(tv, batch)
    assert set(theirs) == {"bbox_regression", "classification"}
    for value in (ours, *theirs.values()):
        v = float(value.detach())
        assert value.ndim == 0 and math.isfinite(v) and v > 0
    # both backpropagate into the one shared network
    net.zero_grad()
    (ours + sum(theirs.values())).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert {id(p) for p in tv.parameters()} == {id(p) for p in net.parameters()}


def test_torchvision_wrapper_is_the_same_detector(net_and_batch) -> None:
    """Same backbone, heads, anchors and box coding: torchvision's eval path and our postprocess
    return the same detections (head weights scaled down so no score saturates at 1.0: NMS
    orders equal scores by its input order, which differs - anchor order here, topk's there)."""
    net, batch = net_and_batch
    net.eval()
    tv = build_torchvision_ssd(net).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():
            for conv in [*net.heads.cls, *net.heads.box]:
                conv.weight.mul_(0.02)
            for conv in net.heads.cls:
                conv.weight.mul_(0.1)
            loc, logits = net(batch["images"])
            scores = logits.softmax(-1)[..., 1]
            assert scores.max() < 1 and (scores > 0.5).sum() > 400  # no ties; many candidates
            ours = postprocess(
                loc, logits, net.anchors_cxcywh, batch["orig_sizes"], **PREDICT_DEFAULTS
            )
            theirs = tv(list(batch["images"]))
    finally:
        net.load_state_dict(state)
    for o, t in zip(ours, theirs, strict=True):
        assert len(o["boxes"]) == len(t["boxes"]) > 0
        torch.testing.assert_close(o["boxes"], t["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(o["scores"], t["scores"])
        assert torch.equal(o["labels"], t["labels"])


def test_options_are_checked(tmp_path: Path) -> None:
    opts = parse_options(["device=cpu", "batch_sizes=[2,4]", "sections=step,fit"])
    assert opts.batch_sizes == [2, 4] and opts.sections == ["step", "fit"]
    assert opts.fit_batch_size == 2 and opts.channels_last is False
    for bad, match in (
        (["nonsense=1"], "unknown"),
        (["sections=[warp]"], "sections"),
        (["device=tpu"], "device"),
        (["precision=fp8"], "precision"),
        (["steps"], "key=value"),
        (["batch_sizes=[-1]"], r"batch_sizes=\[-1\]"),
        (["warmup=-1"], "warmup=-1"),
        # YAML values of the wrong type: one message each, before any timing
        (["batch_sizes=abc"], "batch_sizes='abc': must be a list of integers >= 1"),
        (["batch_sizes=[2,0]"], "batch_sizes"),
        (["image_size=10"], "image_size=10: must be an integer >= 64"),
        (["steps=1.5"], "steps=1.5: must be an integer"),
        (["compile=maybe"], "compile='maybe': allowed true, false"),
        (["fit_batches=0"], "fit_batches=0: must be null or an integer"),
    ):
        with pytest.raises(OptionError, match=match):
            parse_options(["device=cpu", *bad])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OptionError, match="out=.*cannot create"):
        parse_options(["device=cpu", f"out={blocker / 'b.json'}"])


def test_command_runs_end_to_end_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "ssd_lightning.benchmark",
        "device=cpu",
        "image_size=128",
        "batch_sizes=[2]",
        "steps=1",
        "warmup=0",
        "repeats=1",
        "data_samples=4",
        "fit_epochs=1",
        "fit_batches=1",
        f"out={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio 2/1" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result) >= {"meta", "train", "data", "fit", "table"}
    train = result["train"]["2"]
    for key in ("bare", "step", "torchvision"):
        assert train[key]["img_per_s"] > 0
    assert set(train["ratios"]) == {"step/bare", "torchvision/bare", "step/torchvision"}
    assert all(v > 0 for v in train["ratios"].values())
    assert math.isfinite(train["step"]["final_loss"])
    assert math.isfinite(train["torchvision"]["final_loss"])
    inf = train["inference"]
    assert {"bare", "detect", "torchvision", "ratios"} <= set(inf)
    assert set(inf["ratios"]) >= {"detect/bare", "torchvision/bare", "detect/torchvision"}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        # the exported detector, same network and thresholds: the same detections, timed
        assert inf["onnxruntime"]["img_per_s"] > 0 and inf["ratios"]["onnxruntime/detect"] > 0
        assert inf["onnxruntime"]["detections_per_image"] == inf["detections_per_image"]
        assert "4 onnxruntime detector (CPU)" in proc.stdout
    else:
        assert "pip install -e '.[onnx]'" in result["onnxruntime"]
    data = result["data"]
    for timed in (data, data["without_masks"]):  # safe_crop with tight boxes, and without
        assert timed["cpu_pipeline"]["img_per_s_per_worker"] > 0
        assert timed["gpu_path_cpu_side"]["img_per_s_per_worker"] > 0
    assert data["gpu_path_pixels"]["2"]["img_per_s"] > 0
    fit = result["fit"]
    assert fit["epochs"] == 1 and fit["train_img_per_s"] > 0 and fit["fit/step"] > 0
    assert result["meta"]["device"] == "cpu" and result["meta"]["num_anchors"] > 0


def test_data_section_of_a_preset_without_a_gpu_path(tmp_path: Path) -> None:
    """iou_crop (the default) has no GPU implementation: its CPU pipeline is timed, the GPU
    path is reported as not timed (it raised NoGpuKernel before)."""
    opts = Options(
        sections=["data"],
        augmentation="iou_crop",
        data_samples=3,
        repeats=1,
        image_size=128,
        out=str(tmp_path / "bench.json"),
    )
    lines: list[str] = []
    data = run(opts, lines.append)["data"]
    assert data["cpu_pipeline"]["img_per_s_per_worker"] > 0
    assert data["without_masks"]["cpu_pipeline"]["img_per_s_per_worker"] > 0
    assert "gpu_path_cpu_side" not in data and data["gpu_path_pixels"] == {}
    assert "RandomZoomOut" in data["gpu_path"]
    table = json.loads((tmp_path / "bench.json").read_text())["table"]
    assert "5 data, CPU pipeline" in table and "not timed: no GPU implementation" in table
