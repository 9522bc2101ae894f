"""Detect pedestrians in any photo: ``python -m ssd_lightning.predict ckpt_path=... input=...``.

``input`` is one image or a folder of images (JPEG, PNG, BMP, WebP, TIFF; any size; grayscale,
palette, RGBA and 16-bit images are converted to RGB; EXIF orientation is applied, as phones
store it). ``ckpt_path`` is a Lightning ``.ckpt`` or the exported
``ssd_resnet34_pennfudan_best.pt`` (no Lightning needed for the latter).

Writes ``<output_dir>/<name>_pred.<ext>`` with the boxes drawn and ``<output_dir>/detections.json``
with, per image, its size and the detections: boxes xyxy in original image pixels, scores, labels.

Examples::

    python -m ssd_lightning.predict \\
        ckpt_path=outputs/<date>/<time>/ssd_resnet34_pennfudan_best.pt \\
        input=~/Pictures/street.jpg
    python -m ssd_lightning.predict ckpt_path=last.ckpt input=photos/ score_threshold=0.3 top_k=50
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue
from PIL import Image, ImageOps, UnidentifiedImageError

from ssd_lightning.config import ConfigError, config_path_or_exit, exit_with_error
from ssd_lightning.data.dataset import CLASS_NAMES

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class InputError(ValueError):
    """A missing or unreadable input; the message names it."""


def list_inputs(path: str | Path) -> list[Path]:
    """One image file, or the image files of a folder (sorted, not recursive)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"input={path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"input={path}: the folder holds no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_rgb(path: str | Path) -> torch.Tensor:
    """Any image file -> uint8 (3, H, W) RGB, EXIF orientation applied."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale
                arr = np.asarray(im, dtype=np.float32)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent areas become white, not whatever colour hides under alpha 0
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            rgb = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"input {path}: cannot read it as an image ({e})") from e
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def check_thresholds(score_threshold: float | None, nms_threshold: float | None,
                     top_k: int | None) -> None:
    """None = the model's own value; anything else must make sense."""
    checks = (("score_threshold", score_threshold, lambda v: 0 <= v < 1, "a number in [0, 1)"),
              ("nms_threshold", nms_threshold, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              ("top_k", top_k, lambda v: int(v) == v and v >= 1, "an integer >= 1"))
    for key, value, ok, allowed in checks:
        if value is not None and not (isinstance(value, int | float) and ok(value)):
            raise InputError(f"{key}={value!r}: allowed values are {allowed}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    from ssd_lightning.callbacks import draw_detections
    from ssd_lightning.data.transforms import build_eval_transform
    from ssd_lightning.lit_module import PREDICT_DEFAULTS, load_net

    files = list_inputs(inputs)
    check_thresholds(score_threshold, nms_threshold, top_k)
    dev = _device(device)
    net, info = load_net(ckpt_path, map_location=dev)
    thresholds = {**PREDICT_DEFAULTS, **dict(info.get("predict") or {})}
    for key, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold),
                       ("top_k", top_k)):
        if value is not None:
            thresholds[key] = value
    size = int(net.image_size)
    transform = build_eval_transform(size)  # the validation preprocessing: resize to (S, S)
    out_dir = Path(output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    single = len(files) == 1 and Path(inputs).expanduser().is_file()
    stems = Counter(f.stem for f in files)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []

    for start in range(0, len(files), max(1, batch_size)):
        images, originals, names = [], [], []
        for f in files[start:start + batch_size]:
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
        orig_sizes = torch.tensor([list(o.shape[-2:]) for o in originals], device=dev)  # (B,2) h,w
        dets = net.detect(batch, orig_sizes, **thresholds)  # boxes xyxy in original pixels
        for f, orig, det in zip(names, originals, dets, strict=True):
            h, w = orig.shape[-2:]
            record: dict[str, Any] = {
                "file": str(f),
                "height": int(h),
                "width": int(w),
                "detections": [
                    {"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(s), 4),
                     "label": int(lab),
                     "class": CLASS_NAMES[int(lab)] if int(lab) < len(CLASS_NAMES) else str(lab)}
                    for box, s, lab in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                           det["labels"].tolist(), strict=True)
                ],
            }
            if draw:
                width = max(2, round(max(h, w) / 300))
                drawn = draw_detections(orig, {k: v.cpu() for k, v in det.items()}, width=width)
                suffix = ".jpg" if f.suffix.lower() in (".jpg", ".jpeg") else ".png"
                # a.png and a.jpg in one folder must not overwrite each other's drawing
                stem = f.stem if stems[f.stem] == 1 else f"{f.stem}_{f.suffix[1:].lower()}"
                target = out_dir / f"{stem}_pred{suffix}"
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
                record["output"] = str(target)
            records.append(record)
    if not records:
        raise InputError(f"input={inputs}: none of the {len(files)} files could be read")
    result = {
        "model": str(ckpt_path),
        "image_size": size,
        "thresholds": thresholds,
        "box_format": "xyxy, original image pixels",
        "images": records,
        "skipped": skipped,
    }
    (out_dir / "detections.json").write_text(json.dumps(result, indent=2) + "\n")
    n = sum(len(r["detections"]) for r in records)
    log.info("%d image(s), %d detection(s); written to %s", len(records), n, out_dir)
    return result


def _run(cfg: DictConfig) -> None:
    try:
        result = predict(
            cfg.ckpt_path, cfg.input, cfg.output_dir,
            score_threshold=cfg.get("score_threshold"), nms_threshold=cfg.get("nms_threshold"),
            top_k=cfg.get("top_k"), batch_size=int(cfg.batch_size), device=str(cfg.device),
            draw=bool(cfg.draw),
        )
    except (InputError, FileNotFoundError, ValueError, ConfigError, MissingMandatoryValue) as e:
        exit_with_error(e, "Error")
    for r in result["images"]:
        print(f"{r['file']}: {len(r['detections'])} pedestrian(s)"
              + (f" -> {r['output']}" if "output" in r else ""))
    print(f"detections: {Path(cfg.output_dir) / 'detections.json'}")


def main() -> None:
    path = config_path_or_exit()
    hydra.main(version_base="1.3", config_path=path, config_name="predict")(_run)()


if __name__ == "__main__":
    main()
