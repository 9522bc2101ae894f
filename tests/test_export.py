"""ONNX export: the exported detector, run by onnxruntime on real Penn-Fudan images, gives what
``SSD.detect`` gives; predict runs it; the description travels with the files."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PENNFUDAN, make_cfg, run_cli

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.core.postprocess import postprocess
from ssd_lightning.data.images import InputError, read_rgb
from ssd_lightning.data.presets import build_eval_transform
from ssd_lightning.training.checkpoint import CheckpointError, load_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from ssd_lightning.predict import predict  # noqa: E402
from ssd_lightning.tools.export import check_export_options, export, export_model  # noqa: E402
from ssd_lightning.tools.onnx_export import export_onnx  # noqa: E402
from ssd_lightning.tools.onnx_parity import compare_detections  # noqa: E402
from ssd_lightning.tools.onnx_runtime import (  # noqa: E402
    DETECTOR,
    NETWORK,
    OnnxDetector,
    open_session,
    per_image,
)

# parity bounds: the post-processing graph on the same network outputs (boxes in original image
# pixels), the detector end to end (boxes in network-input pixels: there the network's fp32 noise
# moves them, by ~1e-3 px where the tiny model's outputs are in the hundreds), scores
POSTPROCESS_PX, DETECTOR_INPUT_PX, SCORE = 1e-3, 1e-2, 1e-4
IMAGES = sorted((PENNFUDAN / "PNGImages").glob("*.png"))[-6:]  # validation-split images


@pytest.fixture(scope="module")
def exported(tiny_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny run's model exported by the export task (its parity check included)."""
    out = tmp_path_factory.mktemp("export")
    model = tiny_run["dir"] / "ssd_resnet34_best.pt"
    cfg = make_cfg([f"ckpt_path={model}", f"output_dir={out}", "name=tiny"], out / "run", "export")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        export(cfg)
    return {"dir": out, "model": model, "stdout": stdout.getvalue(), "onnx": out / "tiny.onnx"}


def _batch(size: int, files: list[Path] = IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    originals = [read_rgb(f) for f in files]
    transform = build_eval_transform(size)
    images = torch.stack([transform(o) for o in originals])
    return images, torch.tensor([list(o.shape[-2:]) for o in originals])


def _assert_same_detections(
    got: list[dict], ref: list[dict], box_px: float, px_scale: torch.Tensor | None = None
) -> None:
    """Same count per image; each box matched one to one to a reference box with the same label,
    within ``box_px`` (pixels of the boxes, or divided by ``px_scale`` (B,2) (h, w)); matched
    scores within SCORE."""
    assert sum(len(d["boxes"]) for d in ref) > 0, "nothing detected: the comparison would be empty"
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert len(g["boxes"]) == len(r["boxes"]), f"image {i}"
        if not len(r["boxes"]):
            continue
        scale = 1.0 if px_scale is None else px_scale[i].flip(0).repeat(2)  # (w, h, w, h)
        dist = ((g["boxes"][:, None] - r["boxes"][None]).abs() / scale).amax(-1)
        dist[g["labels"][:, None] != r["labels"][None]] = float("inf")
        best = dist.argmin(1)
        assert best.unique().numel() == len(best), f"image {i}: two boxes matched to one"
        assert dist.min(1).values.max() <= box_px, f"image {i}"
        assert (g["scores"] - r["scores"][best]).abs().max() <= SCORE, f"image {i}"


def test_postprocess_graph_is_core_postprocess(exported: dict) -> None:
    net, info = load_model(exported["model"])
    session, meta = open_session(exported["dir"] / "tiny_postprocess.onnx")
    thr = info["predict"]
    assert meta["thresholds"] == thr  # the model's own thresholds, fixed in the graph
    images, sizes = _batch(int(net.image_size))
    with torch.no_grad():
        loc, logits = net(images)
    for lo, hi in ((0, len(images)), (0, 1), (2, 5)):  # the batch axis is dynamic
        feeds = {"loc": loc[lo:hi].numpy(), "logits": logits[lo:hi].numpy()}
        feeds["orig_sizes"] = sizes[lo:hi].numpy()
        got = per_image(session.run(None, feeds), hi - lo, thr["score_threshold"], thr["top_k"])
        ref = postprocess(loc[lo:hi], logits[lo:hi], net.anchors_cxcywh, sizes[lo:hi], **thr)
        _assert_same_detections(got, ref, POSTPROCESS_PX)


def test_onnxruntime_detector_matches_ssd_detect(exported: dict) -> None:
    net, info = load_model(exported["model"])
    onnx = OnnxDetector(exported["onnx"])
    assert onnx.thresholds == info["predict"]
    images, sizes = _batch(onnx.image_size)
    input_px = sizes / images.shape[-1]  # original pixels per network-input pixel
    ref = net.detect(images, sizes, **info["predict"])
    _assert_same_detections(onnx.detect(images, sizes), ref, DETECTOR_INPUT_PX, input_px)
    for lo, hi in ((0, 1), (2, 5)):  # one image alone, a batch of three
        part = onnx.detect(images[lo:hi], sizes[lo:hi])
        _assert_same_detections(part, ref[lo:hi], DETECTOR_INPUT_PX, input_px[lo:hi])
    # without orig_sizes the boxes are in the pixels of the network input, as SSD.detect's
    ref = net.detect(images, **info["predict"])
    _assert_same_detections(onnx.detect(images), ref, DETECTOR_INPUT_PX)


def test_network_graph_and_description(exported: dict) -> None:
    net, info = load_model(exported["model"])
    sidecar = json.loads((exported["dir"] / "tiny.json").read_text())
    session, meta = open_session(exported["dir"] / "tiny_network.onnx")
    assert meta["graph"] == "network" and sidecar["network"] == "tiny_network.onnx"
    for key in ("image_size", "thresholds", "class_names", "anchors", "normalization"):
        assert meta[key] == sidecar[key], key
    assert sidecar["image_size"] == 128 and sidecar["class_names"] == ["background", "pedestrian"]
    assert (
        sidecar["anchors"]["name"] == "pennfudan_fitted"
        and sidecar["thresholds"] == info["predict"]
    )
    assert sidecar["parity"]["ok"] and sidecar["parity"]["detector"]["detections"] > 0
    assert sidecar["postprocess"] == "tiny_postprocess.onnx"
    images, _ = _batch(128, IMAGES[:2])
    loc, logits, anchors = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref_loc, ref_logits = net(images)
    assert torch.equal(torch.from_numpy(anchors), net.anchors_cxcywh)
    for got, ref in ((loc, ref_loc), (logits, ref_logits)):
        torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-5 * ref.abs().max(), rtol=0)
    assert "parity with PyTorch on 8 images" in exported["stdout"]


def test_predict_runs_the_onnx_detector(exported: dict, tmp_path: Path) -> None:
    inputs = tmp_path / "photos"
    inputs.mkdir()
    for f in IMAGES[:3]:
        (inputs / f.name).write_bytes(f.read_bytes())
    pt = predict(exported["model"], inputs, tmp_path / "pt", draw=False, device="cpu")
    ox = predict(exported["onnx"], inputs, tmp_path / "onnx", draw=True)
    assert ox["thresholds"] == pt["thresholds"] and ox["class_names"] == pt["class_names"]
    for a, b in zip(ox["images"], pt["images"], strict=True):
        assert (a["file"], a["height"], a["width"]) == (b["file"], b["height"], b["width"])
        assert len(a["detections"]) == len(b["detections"]) > 0
        assert Path(a["output"]).is_file()
    # a stricter score threshold / smaller top-k is applied after the graph, exactly
    strict = predict(exported["onnx"], inputs, tmp_path / "s", score_threshold=0.9, top_k=3)
    ref = predict(exported["model"], inputs, tmp_path / "r", score_threshold=0.9, top_k=3)
    for a, b in zip(strict["images"], ref["images"], strict=True):
        assert [d["score"] for d in a["detections"]] == pytest.approx(
            [d["score"] for d in b["detections"]], abs=SCORE
        )


def test_a_model_with_a_pre_nms_cap_predicts_in_onnxruntime(exported: dict, tmp_path: Path) -> None:
    # model.predict.pre_nms_top_k set in training travels into the graph and its description
    net, info = load_model(exported["model"])
    thresholds = {**info["predict"], "pre_nms_top_k": 400}
    export_onnx(net, info, tmp_path, "capped", thresholds, graphs=(DETECTOR,))
    capped = tmp_path / "capped.onnx"
    ox = predict(capped, IMAGES[0], tmp_path / "onnx", draw=False)
    pt = predict(exported["model"], IMAGES[0], tmp_path / "pt", draw=False, device="cpu")
    assert ox["thresholds"]["pre_nms_top_k"] == 400
    assert len(ox["images"][0]["detections"]) == len(pt["images"][0]["detections"]) > 0
    with pytest.raises(ValueError, match="pre_nms_top_k=100: capped.onnx was exported with"):
        OnnxDetector(capped).check_thresholds(pre_nms_top_k=100)


def test_user_mistakes_are_one_message(exported: dict, tmp_path: Path) -> None:
    photo = IMAGES[0]
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={exported['onnx']}",
        f"input={photo}",
        f"output_dir={tmp_path}",
        "score_threshold=0.2",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "score_threshold=0.2" in r.stderr and "export again" in r.stderr
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={exported['dir'] / 'tiny_network.onnx'}",
        f"input={photo}",
        f"output_dir={tmp_path}",
    )
    assert r.returncode == 2 and "network graph alone" in r.stderr and "tiny.onnx" in r.stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exported["onnx"].read_bytes()[:5000])
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        OnnxDetector(broken)
    r = run_cli("ssd_lightning.export", f"ckpt_path={exported['model']}", "format=tflite")
    assert r.returncode == 2 and "format='tflite': allowed values are onnx" in r.stderr


def test_a_switch_that_is_not_true_or_false_is_refused(exported: dict, tmp_path: Path) -> None:
    # "no" would read as true and run the check the user wanted off
    cfg = make_cfg(
        [f"ckpt_path={exported['model']}", f"output_dir={tmp_path}", "check.enabled=no"],
        tmp_path / "run",
        "export",
    )
    with pytest.raises(ConfigError, match="check.enabled: true or false, got 'no'"):
        export(cfg)
    assert not list(tmp_path.glob("*.onnx"))


def test_an_opset_the_exporter_cannot_write_is_refused() -> None:
    # the version converter gives up past the newest opset onnx knows and keeps opset 18: the
    # files and their description said opset 99 of a graph at opset 18
    newest = onnx.defs.onnx_opset_version()
    check_export_options("onnx", newest, None)
    for opset in (17, newest + 1, 99):
        with pytest.raises(ConfigError, match=f"opset={opset}: allowed values are"):
            check_export_options("onnx", opset, None)


def _dets(boxes: list[list[float]], scores: list[float]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes),
        "scores": torch.tensor(scores),
        "labels": torch.ones(len(scores), dtype=torch.int64),
    }


def test_parity_allows_a_tie_at_the_cut_not_a_real_difference() -> None:
    # a trained model on a crowded photo: the 100th and 101st detections scored 0.11045341 and
    # 0.1104534 in PyTorch; onnxruntime's fp32 noise kept the other one of the two, and the export
    # failed its parity check (FudanPed00026, score_threshold=0.05 top_k=100)
    a, b, c = [10.0, 10, 50, 90], [200.0, 20, 240, 120], [100.0, 240, 140, 335]
    ref = [_dets([a, b], [0.9, 0.11045341])]
    swapped = compare_detections([_dets([a, c], [0.9, 0.11045359])], ref, 1e-3)
    assert swapped["ok"] and swapped["max_box_diff_px"] == 0.0 and swapped["boundary"] == 1
    # a box above the threshold on one side only, by less than the score tolerance
    extra = compare_detections(
        [_dets([a, c], [0.9, 0.50000003])], [_dets([a], [0.9])], 1e-3, None, 0.5
    )
    assert extra["ok"] and extra["boundary"] == 1
    for ours in ([_dets([a, c], [0.9, 0.6])], [_dets([a, c], [0.9, 0.11])], [_dets([c], [0.9])]):
        assert not compare_detections(ours, ref, 1e-3, None, 0.05)["ok"]


def test_the_exporter_says_nothing_a_user_cannot_act_on(
    exported: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the network graph returns its anchors, an initializer: onnx_ir warned that it could not
    # deduplicate it, on every export
    net, info = load_model(exported["model"])
    with caplog.at_level(logging.DEBUG):
        export_onnx(net, info, tmp_path, "quiet", info["predict"], graphs=(NETWORK,))
    assert (tmp_path / "quiet_network.onnx").is_file()
    noise = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noise, [r.getMessage() for r in noise]


def test_an_output_dir_that_cannot_be_one_is_one_message(tmp_path: Path) -> None:
    taken = tmp_path / "model.pt"
    taken.write_bytes(b"")
    for out, why in ((taken, "is a file, not a folder"), (taken / "sub", "cannot create it")):
        with pytest.raises(ConfigError, match=f"output_dir={re.escape(str(out))}: {why}"):
            export_model(tmp_path / "no_model.pt", out)
    export_model_dir = tmp_path / "new" / "nested"  # a folder that does not exist yet is made
    with pytest.raises(CheckpointError, match="no_model.pt: no such file"):
        export_model(tmp_path / "no_model.pt", export_model_dir)
    assert export_model_dir.is_dir()


def test_the_parity_check_skips_unreadable_photos_and_checks_the_folder_first(
    exported: dict, tmp_path: Path
) -> None:
    """check.images=<a user's folder>: a broken link or a text file named .jpg there is skipped
    (as predict skips it), not the end of the export; a folder without a readable photo stops
    it before any graph is written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a_broken.jpg").symlink_to(photos / "gone.jpg")
    (photos / "b_notes.jpg").write_text("not a photo")
    for f in IMAGES[:2]:
        (photos / f.name).write_bytes(f.read_bytes())
    meta = export_model(
        exported["model"], tmp_path / "out", name="m", check_folder=photos, check_count=2
    )
    assert meta["parity"]["ok"] and meta["parity"]["images"] == 2
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.jpg").write_text("not a photo")
    with pytest.raises(InputError, match="no readable images there"):
        export_model(exported["model"], tmp_path / "out2", name="m", check_folder=notes)
    assert not list((tmp_path / "out2").glob("*.onnx"))


@pytest.mark.parametrize("value", ["0", "abc"])
def test_a_parity_image_count_that_is_no_count_is_one_message(tmp_path: Path, value: str) -> None:
    r = run_cli(
        "ssd_lightning.export",
        f"ckpt_path={tmp_path / 'model.pt'}",  # refused before the model is read
        f"check.num_images={value}",
        f"output_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    shown = value if value.isdigit() else repr(value)
    assert f"check.num_images={shown}: allowed values are integers >= 1" in r.stderr
