"""Image files -> uint8 RGB tensors: the one reader of photos, for the dataset and for predict.

Any mode PIL opens becomes (3, H, W) uint8 RGB: grayscale, palette and CMYK are converted;
16-bit and float grayscale are scaled to 0..255 from their full scale (65535; a float image of
[0, 1] from 1.0; PIL's own ``convert`` would clip them to white);
transparent areas become white (not whatever colour hides under alpha 0); the EXIF orientation
is applied, as phones store it. Unreadable files, and images over PIL's decompression-bomb limit,
raise ``InputError`` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ssd_lightning.config.errors import UserFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class InputError(UserFileError, ValueError):
    """A missing or unreadable input; the message names it."""


def _full_scale(mode: str, arr: np.ndarray) -> float:
    """The value that is white in a high-bit image: 65535 in a 16-bit one (also a dark picture
    whose values all stay below 256); 1.0 in a float image of [0, 1]; else guessed from the data
    (mode I also holds 8-bit data)."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(arr.max()) if arr.size else 0.0
    if mode == "F" and top <= 1.0:
        return 1.0
    return 65535.0 if top > 255 else 255.0


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _HIGH_BIT_MODES:
        arr = np.asarray(im, dtype=np.float32)
        scale = 255.0 / _full_scale(im.mode, arr)
        im = Image.fromarray((arr * scale).clip(0, 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def broken_link_note(path: Path) -> str:
    """For a missing ``path`` that is a link, what it points to (else ""): a user's folder of
    photos may hold links to files moved since."""
    return f" (a link to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` by suffix, sorted, not recursive. A broken link is kept,
    for the reader to report as skipped rather than to vanish from the count."""
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.suffix.lower() in IMAGE_SUFFIXES
    )


def read_rgb(path: str | Path, exif_transpose: bool = True) -> Tensor:
    """Any image file -> uint8 (3, H, W) RGB. ``exif_transpose``: apply the EXIF orientation
    (photos; a dataset whose annotations refer to the stored pixels passes False)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.array(_to_rgb(ImageOps.exif_transpose(im) if exif_transpose else im))
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: too large to decode safely ({e})") from e
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file{broken_link_note(path)}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot read it as an image ({e})") from e
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
