"""Detect pedestrians in any photo: ``python -m ssd_lightning.predict ckpt_path=... input=...``.

``input`` is one image or a folder of images (JPEG, PNG, BMP, WebP, TIFF, GIF; any size;
grayscale, palette, RGBA and 16-bit images are converted to RGB; EXIF orientation is applied, as
phones store it). ``ckpt_path`` is a Lightning ``.ckpt``, the exported
``ssd_resnet34_best.pt``, or a detector ``.onnx`` written by ``ssd_lightning.export``
(run by onnxruntime: ``pip install -e '.[onnx]'``); this tool imports no Lightning.

Writes ``<output_dir>/<name>_pred.<ext>`` with the boxes drawn and ``<output_dir>/detections.json``
with, per image, its size and the detections: boxes xyxy in original image pixels, scores, labels
and class names. Files that cannot be read are skipped and listed under ``skipped``.

Examples::

    python -m ssd_lightning.predict \\
        ckpt_path=outputs/<date>/<time>/ssd_resnet34_best.pt \\
        input=~/Pictures/street.jpg
    python -m ssd_lightning.predict ckpt_path=last.ckpt input=photos/ score_threshold=0.3 top_k=50
    python -m ssd_lightning.predict ckpt_path=outputs/export/<date>/<time>/last.onnx input=photos/
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image

from ssd_lightning.config.cli import hydra_main
from ssd_lightning.core.plain import is_int
from ssd_lightning.core.postprocess import check_thresholds
from ssd_lightning.data.dataset import CLASS_NAMES
from ssd_lightning.data.images import (
    IMAGE_SUFFIXES,
    InputError,
    broken_link_note,
    image_files,
    read_rgb,
)
from ssd_lightning.data.presets import build_eval_transform
from ssd_lightning.tools.onnx_runtime import OnnxDetector
from ssd_lightning.training.checkpoint import load_model
from ssd_lightning.visualize import draw_detections

log = logging.getLogger(__name__)

PRED_SUFFIX = "_pred"  # <stem>_pred.<ext>: a drawn output, never an input of a re-run into it


def _drawn_before(folder: Path) -> set[str]:
    """Names of the drawings an earlier predict wrote into ``folder``, as its detections.json
    there records them (whatever output_dir this run has)."""
    try:
        records = json.loads((folder / "detections.json").read_text()).get("images", [])
        outputs = [Path(r["output"]) for r in records if isinstance(r.get("output"), str)]
    except (OSError, ValueError, AttributeError, TypeError):
        return set()  # none there, or not ours
    here = folder.resolve()
    return {o.name for o in outputs if o.parent.resolve() == here}


def list_inputs(path: str | Path, output_dir: Path | None = None) -> list[Path]:
    """One image file, or the image files of a folder (sorted, not recursive). The drawn outputs
    of an earlier run into the folder are left out (those its detections.json lists; when the
    folder is also this run's output dir, every ``*_pred`` file). A broken link is kept, to be
    reported as skipped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"input={path}: no such file or folder{broken_link_note(path)}")
    if path.is_file():
        return [path]
    files = image_files(path)
    drawn = _drawn_before(path)
    same_dir = output_dir is not None and output_dir.resolve() == path.resolve()
    earlier = [p for p in files if p.name in drawn or (same_dir and p.stem.endswith(PRED_SUFFIX))]
    if earlier:
        log.info("input=%s: %d drawn outputs of an earlier predict left out", path, len(earlier))
        files = [p for p in files if p not in earlier]
    if not files:
        raise InputError(
            f"input={path}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def output_names(files: list[Path]) -> dict[Path, str]:
    """The file name of each input's drawing: ``<stem>_pred.<jpg|png>``. Inputs that share a stem
    add their suffix (a.png, a.jpg -> a_png_pred.png, a_jpg_pred.jpg), and a name still taken
    gets a counter (compared without case, as on macOS and Windows): no drawing overwrites
    another."""
    stems = Counter(f.stem.lower() for f in files)
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for f in files:
        ext = ".jpg" if f.suffix.lower() in (".jpg", ".jpeg") else ".png"
        stem = f.stem if stems[f.stem.lower()] == 1 else f"{f.stem}_{f.suffix[1:]}"
        name, n = f"{stem}{PRED_SUFFIX}{ext}", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}_{n}{PRED_SUFFIX}{ext}"
        taken.add(name.lower())
        names[f] = name
    return names


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"device={name!r}: allowed values are auto, cpu, cuda, cuda:<n>") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={name}: no CUDA GPU is available here; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device={name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise InputError(f"device={name!r}: allowed values are auto, cpu, cuda, cuda:<n>")
    return device


def _output_dir(path: str | Path) -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir={out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output_dir={out}: cannot create it ({e.strerror})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"output_dir={out}: not writable")
    return out


def _load_detector(
    ckpt_path: str | Path, device: str, given: dict[str, Any]
) -> tuple[Callable[..., list[dict[str, torch.Tensor]]], int, list[str], dict, torch.device]:
    """(detect, input size, class names, thresholds, device of the input batches) for a .ckpt /
    .pt model in PyTorch, or an exported .onnx detector in onnxruntime."""
    if Path(str(ckpt_path)).suffix.lower() == ".onnx":
        model = OnnxDetector(ckpt_path, device)
        thresholds = model.check_thresholds(**given)  # stricter than the exported ones, or none
        return model.detect, model.image_size, model.class_names, thresholds, torch.device("cpu")
    dev = _device(device)
    net, info = load_model(ckpt_path, map_location=dev)
    class_names = list(info.get("class_names") or CLASS_NAMES)
    return net.detect, int(net.image_size), class_names, {**info["predict"], **given}, dev


def predict(
    ckpt_path: str | Path,
    inputs: str | Path,
    output_dir: str | Path,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    top_k: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    draw: bool = True,
) -> dict[str, Any]:
    """Run the model on ``inputs``; write drawn images and ``detections.json`` to ``output_dir``.

    Returns the JSON content. Thresholds default to those stored with the model.
    """
    if not isinstance(inputs, str | os.PathLike):  # input=null, input=[a,b]
        raise InputError(f"input={inputs}: give one image or one folder of images (a path)")
    if not isinstance(draw, bool):
        raise InputError(f"draw={draw!r}: allowed values are true, false")
    given = {"score_threshold": score_threshold, "nms_threshold": nms_threshold, "top_k": top_k}
    try:
        given = check_thresholds({k: v for k, v in given.items() if v is not None}, "predict")
    except ValueError as e:
        raise InputError(str(e).removeprefix("predict.")) from None
    if not is_int(batch_size, 1):
        raise InputError(f"batch_size={batch_size!r}: allowed values are integers >= 1")
    out_dir = _output_dir(output_dir)
    files = list_inputs(inputs, out_dir)
    detect, size, class_names, thresholds, dev = _load_detector(ckpt_path, device, given)
    transform = build_eval_transform(size)  # the validation preprocessing: resize to (S, S)
    single = len(files) == 1 and Path(inputs).expanduser().is_file()
    drawings = output_names(files)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []

    for start in range(0, len(files), batch_size):
        images, originals, names = [], [], []
        for f in files[start : start + batch_size]:
            try:
                img = read_rgb(f)
            except InputError as e:
                if single:
                    raise
                log.warning("%s: skipped", e)
                skipped.append({"file": str(f), "error": str(e)})
                continue
            originals.append(img)
            images.append(transform(img))
            names.append(f)
        if not images:
            continue
        batch = torch.stack(images).to(dev)  # (B,3,S,S) float [0,1]
        orig_sizes = torch.tensor([list(o.shape[-2:]) for o in originals], device=dev)  # (B,2) hw
        dets = detect(batch, orig_sizes, **thresholds)  # boxes xyxy in original pixels
        for f, orig, det in zip(names, originals, dets, strict=True):
            det = {k: v.cpu() for k, v in det.items()}
            h, w = orig.shape[-2:]
            record: dict[str, Any] = {
                "file": str(f),
                "height": int(h),
                "width": int(w),
                "detections": [
                    {
                        "box_xyxy": [round(float(v), 2) for v in box],
                        "score": round(float(s), 4),
                        "label": int(lab),
                        "class": class_names[lab] if lab < len(class_names) else str(lab),
                    }
                    for box, s, lab in zip(
                        det["boxes"].tolist(),
                        det["scores"].tolist(),
                        det["labels"].tolist(),
                        strict=True,
                    )
                ],
            }
            if draw:
                width = max(2, round(max(h, w) / 300))
                # the class name on every box, one class or many: the picture says what was found
                drawn = draw_detections(orig, det, class_names=class_names, width=width)
                target = out_dir / drawings[f]
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
                record["output"] = str(target)
            records.append(record)
    if not records:
        raise InputError(f"input={inputs}: none of the {len(files)} files could be read")
    result = {
        "model": str(ckpt_path),
        "image_size": size,
        "thresholds": thresholds,
        "class_names": class_names,
        "box_format": "xyxy, original image pixels",
        "images": records,
        "skipped": skipped,
    }
    (out_dir / "detections.json").write_text(json.dumps(result, indent=2) + "\n")
    n = sum(len(r["detections"]) for r in records)
    log.info("%d image(s), %d detection(s); written to %s", len(records), n, out_dir)
    return result


def task(cfg: DictConfig) -> None:
    result = predict(
        cfg.ckpt_path,
        cfg.input,
        cfg.output_dir,
        score_threshold=cfg.get("score_threshold"),
        nms_threshold=cfg.get("nms_threshold"),
        top_k=cfg.get("top_k"),
        batch_size=cfg.batch_size,
        device=str(cfg.device),
        draw=cfg.draw,
    )
    for r in result["images"]:
        print(
            f"{r['file']}: {len(r['detections'])} detection(s)"
            + (f" -> {r['output']}" if "output" in r else "")
        )
    for s in result["skipped"]:
        print(f"{s['file']}: skipped ({s['error']})")
    print(f"detections: {Path(cfg.output_dir) / 'detections.json'}")


main = hydra_main("predict", task)


if __name__ == "__main__":
    main()
