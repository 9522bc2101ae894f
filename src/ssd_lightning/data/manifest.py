"""Checksum manifest and committed train/val split of the vendored Penn-Fudan dataset.

`verify_dataset(root, manifest)` is the cheap start-up check (names + sizes); pass ``full=True``
for sha256. Regenerate the committed JSONs (only when the dataset itself changes) with::

    python -m ssd_lightning.data.manifest --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from ssd_lightning.config.cli import run_tool
from ssd_lightning.config.errors import DataError, ToolParser
from ssd_lightning.config.paths import data_dir

IMAGE_DIR, MASK_DIR = "PNGImages", "PedMasks"
SPLIT_SEED, SPLIT_VAL_SIZE = 20240601, 50

_FIX = (
    "Restore the dataset with `git checkout -- data/PennFudanPed` (vendored copy), or set "
    "data.download=true to fetch the official archive into data.root. A dataset of your own in "
    "the Penn-Fudan layout (PNGImages/, PedMasks/) is not checked against the manifest with "
    "data.verify=none data.split=null (every image under data.root)."
)


class DatasetIntegrityError(DataError, RuntimeError):
    """The dataset on disk does not match the committed manifest or split."""


def mask_name(image_name: str) -> str:
    """`FudanPed00001.png` -> `FudanPed00001_mask.png` (the Penn-Fudan naming rule)."""
    return image_name[: -len(".png")] + "_mask.png"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_image_names(root: str | Path) -> list[str]:
    """Sorted file names of the images under `root/PNGImages`."""
    return sorted(p.name for p in (Path(root) / IMAGE_DIR).glob("*.png"))


def build_manifest(root: str | Path) -> dict:
    """Manifest of every file the code reads: images and masks (path relative to root)."""
    root = Path(root)
    files = []
    for name in list_image_names(root):
        for rel in (f"{IMAGE_DIR}/{name}", f"{MASK_DIR}/{mask_name(name)}"):
            p = root / rel
            files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return {"dataset": "PennFudanPed", "num_images": len(files) // 2, "files": files}


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise DatasetIntegrityError(f"{path}: a folder, not a JSON file")
    if not path.is_file():
        raise DatasetIntegrityError(
            f"{path} not found. It is committed with the repository; regenerate it with "
            "`python -m ssd_lightning.data.manifest --write` only if the dataset changed."
        )
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetIntegrityError(f"{path} is not valid JSON ({e}); restore it from git") from e
    if not isinstance(blob, dict):  # null, a list, a string: no manifest or split file at all
        raise DatasetIntegrityError(
            f"{path}: not a manifest or split file (a JSON object), but {type(blob).__name__}"
            "; restore it from git"
        )
    return blob


def verify_dataset(root: str | Path, manifest: str | Path | dict, full: bool = False) -> int:
    """Check that every manifest file exists with its size (and sha256 if `full`).

    Returns the number of files checked; raises DatasetIntegrityError naming every bad file.
    """
    root = Path(root)
    man = manifest if isinstance(manifest, dict) else load_json(manifest)
    if not root.is_dir():
        raise DatasetIntegrityError(
            f"dataset root {root} does not exist (config key data.root). {_FIX}"
        )
    problems = []
    for entry in man["files"]:
        p = root / entry["path"]
        if not p.is_file():
            problems.append(f"missing: {p}")
        elif p.stat().st_size != entry["size"]:
            problems.append(
                f"changed size: {p} ({p.stat().st_size} bytes, expected {entry['size']})"
            )
        elif full and sha256_file(p) != entry["sha256"]:
            problems.append(f"changed content (sha256 mismatch): {p}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise DatasetIntegrityError(
            f"Penn-Fudan dataset at {root} does not match the manifest "
            f"({len(problems)} problem(s)):\n  {shown}\n{_FIX}"
        )
    return len(man["files"])


def build_split(
    names: Sequence[str], seed: int = SPLIT_SEED, val_size: int = SPLIT_VAL_SIZE
) -> dict:
    """A seeded permutation of all names; the first `val_size` are validation, the rest train."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return {
        "seed": seed,
        "val_size": val_size,
        "note": "order is the seeded permutation; val = order[:val_size], train = the rest. "
        "A different data.val_size takes order[:val_size] as validation.",
        "val": sorted(order[:val_size]),
        "train": sorted(order[val_size:]),
        "order": order,
    }


def split_names(
    split: str | Path | dict, val_size: int | None = None
) -> tuple[list[str], list[str]]:
    """(train, val) name lists from the committed split. `val_size` None = the committed 50;
    otherwise the first `val_size` names of the committed seeded order (0 = everything trains).
    Raises ``DatasetIntegrityError`` for a broken split file, ``ValueError`` (naming
    ``data.val_size``) for a size the split cannot give."""
    s = split if isinstance(split, dict) else load_json(split)
    where = "the split" if isinstance(split, dict) else str(split)
    s = s if isinstance(s, dict) else {}
    order, committed = s.get("order"), s.get("val_size")
    if not (
        isinstance(order, list)
        and order
        and all(isinstance(n, str) for n in order)
        and isinstance(committed, int)
        and isinstance(s.get("val"), list)
    ):
        raise DatasetIntegrityError(
            f"{where}: not a split file (needs 'order': [names], 'val_size': int, 'val': [names]); "
            "restore it from git or regenerate it with `python -m ssd_lightning.data.manifest "
            "--write`"
        )
    k = committed if val_size is None else int(val_size)
    if not 0 <= k < len(order):
        raise ValueError(
            f"data.val_size={val_size}: allowed values are 0 (no validation) to {len(order) - 1} "
            f"({where} has {len(order)} images)"
        )
    if k == committed and sorted(order[:k]) != sorted(s["val"]):
        raise DatasetIntegrityError(f"{where} is inconsistent: 'val' differs from order[:val_size]")
    return sorted(order[k:]), sorted(order[:k])


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = ToolParser(
        prog="python -m ssd_lightning.data.manifest",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--root", type=Path, help="default: data/PennFudanPed")
    ap.add_argument("--manifest", type=Path, help="default: data/pennfudan_manifest.json")
    ap.add_argument("--split", type=Path, help="default: data/pennfudan_split.json")
    ap.add_argument("--write", action="store_true", help="(re)write manifest and split JSONs")
    ap.add_argument("--full", action="store_true", help="verify sha256 too")
    ap.add_argument("--seed", type=int, default=SPLIT_SEED)
    args = ap.parse_args(argv)
    root = args.root or data_dir() / "PennFudanPed"
    manifest = args.manifest or data_dir() / "pennfudan_manifest.json"
    split = args.split or data_dir() / "pennfudan_split.json"
    if args.write:
        _write_json(manifest, build_manifest(root))
        _write_json(split, build_split(list_image_names(root), seed=args.seed))
        print(f"wrote {manifest} and {split}")
    n = verify_dataset(root, manifest, full=args.full)  # a DatasetIntegrityError names the file
    print(f"{n} files OK ({'sha256' if args.full else 'names + sizes'})")


if __name__ == "__main__":
    run_tool(main)  # a mistake: one message, exit status 2
