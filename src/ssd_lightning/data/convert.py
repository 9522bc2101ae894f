"""The vendored Penn-Fudan as COCO JSON: a worked example of ``data=coco``, and the two readers
compared on the same images (tests/test_coco.py).

    python -m ssd_lightning.data.convert                 # -> data/pennfudan_coco/{train,val}.json
    python -m ssd_lightning.data.convert --out DIR --split none   # one all.json

Each instance of a mask file becomes an annotation: ``bbox`` the box of the mask (the boxes the
Penn-Fudan reader gives, as [x, y, width, height]), ``segmentation`` the mask as compressed RLE
(exact: no polygon approximation), ``area`` its pixel count, category 1 ``pedestrian``. The
``train`` / ``val`` files follow the committed split (data/pennfudan_split.json), so the same
checkpoint is evaluated on the same images by either reader. ``file_name`` is relative to
``PennFudanPed/PNGImages`` (``data.images_dir``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ssd_lightning.config.atomic import atomic_write
from ssd_lightning.config.cli import run_tool
from ssd_lightning.config.errors import ToolParser, UserFileError
from ssd_lightning.config.paths import data_dir
from ssd_lightning.data.dataset import (
    CLASS_NAMES,
    PEDESTRIAN,
    DatasetReadError,
    _instance_masks,
    header_boxes,
)
from ssd_lightning.data.manifest import (
    IMAGE_DIR,
    MASK_DIR,
    list_image_names,
    mask_name,
    split_names,
)
from ssd_lightning.data.segmentation import rle_encode


def pennfudan_to_coco(root: str | Path, names: Sequence[str], first_id: int = 1) -> dict:
    """A COCO detection dict of the Penn-Fudan images ``names`` under ``root`` (image ids from
    the position in the sorted list of every image, so train and val ids never collide)."""
    root = Path(root)
    every = list_image_names(root)
    images, annotations = [], []
    for name in sorted(names):
        image_id = first_id + every.index(name)
        mask_path = root / MASK_DIR / mask_name(name)
        boxes, (h, w) = header_boxes(root / IMAGE_DIR / name, mask_path)  # xyxy pixel edges
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        masks = _instance_masks(mask_path)[1].numpy()  # (G, H, W) bool, the same order
        for box, mask in zip(boxes.tolist(), masks, strict=True):
            x0, y0, x1, y1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": PEDESTRIAN,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle_encode(mask),
                }
            )
    return {
        "info": {"description": "Penn-Fudan pedestrians (ssd_lightning.data.convert)"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": PEDESTRIAN, "name": CLASS_NAMES[PEDESTRIAN]}],
    }


def main(argv: Sequence[str] | None = None) -> list[Path]:
    ap = ToolParser(
        prog="python -m ssd_lightning.data.convert",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--root", type=Path, help="default: data/PennFudanPed")
    ap.add_argument("--out", type=Path, help="default: data/pennfudan_coco")
    ap.add_argument(
        "--split",
        default=None,
        help="a split file (default: data/pennfudan_split.json) -> train.json + val.json; "
        "'none' -> all.json",
    )
    args = ap.parse_args(argv)
    root = args.root or data_dir() / "PennFudanPed"
    out = args.out or data_dir() / "pennfudan_coco"
    every = list_image_names(root)
    if not every:
        raise DatasetReadError(
            f"--root {root}: no Penn-Fudan images (*.png) under {root / IMAGE_DIR}"
        )
    if args.split == "none":
        parts = {"all": every}
    else:
        split = args.split or data_dir() / "pennfudan_split.json"
        if not Path(split).is_file():
            raise DatasetReadError(f"--split {split}: no such file (a split file, or 'none')")
        train, val = split_names(split)  # a broken file is named
        parts = {"train": train, "val": val}
        unknown = sorted(set(train + val) - set(every))
        if unknown:
            raise DatasetReadError(
                f"--split {split}: {len(unknown)} image(s) not under {root / IMAGE_DIR}, e.g. "
                f"{unknown[0]}"
            )
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for part, names in parts.items():
            path = out / f"{part}.json"
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(pennfudan_to_coco(root, names)) + "\n")
            written.append(path)
            print(f"wrote {path} ({len(names)} images)")
    except OSError as e:  # a file where the folder goes, a read-only place, a full disk
        raise UserFileError(f"--out {out}: cannot write the COCO files there ({e})") from e
    return written


if __name__ == "__main__":
    run_tool(main)  # a mistake: one message, exit status 2
