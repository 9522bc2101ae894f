"""COCO segmentations -> (H, W) bool masks: polygons (rasterized as the COCO tools do, by
faster-coco-eval, the mAP backend), RLE (run lengths, as a list or pycocotools' compressed string;
decoded and encoded here), and a filled box where an annotation has no segmentation or an empty
one.

Masks are (H, W) in the pixels of the stored image; RLE runs go in column-major order,
background first (COCO's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as coco_mask
from torch import Tensor

from ssd_lightning.core.plain import is_int, is_number


def rle_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``): 5-bit
    groups with a continuation bit, counts after the second stored as differences."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p == len(counts):
                raise ValueError("compressed RLE counts end in the middle of a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE counts hold {counts[p]!r}, not an RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_string(counts: Sequence[int]) -> str:
    """Run lengths -> a compressed COCO RLE string (pycocotools' ``rleToString``)."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rle_decode(rle: dict) -> np.ndarray:
    """A COCO RLE (``counts`` a list or a compressed string) -> (H, W) bool. The runs alternate
    background / foreground, background first, in column-major order."""
    h, w = (int(v) for v in rle["size"])
    counts = rle_runs(rle)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def rle_runs(rle: dict) -> list[int]:
    """The run lengths of a COCO RLE, checked: they cover its ``size`` exactly (a ValueError
    says what is wrong)."""
    size, counts = rle["size"], rle["counts"]
    if not (len(size) == 2 and all(is_int(v, low=0) for v in size)):
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    if isinstance(counts, str):
        runs = rle_counts(counts)
    elif all(is_int(c) for c in counts):
        runs = [int(c) for c in counts]
    else:
        raise ValueError("RLE 'counts' must be whole numbers or a compressed string")
    h, w = size
    if min(runs, default=0) < 0 or sum(runs) != h * w:
        raise ValueError(f"RLE counts cover {sum(runs)} pixels, not {h}x{w} (its 'size')")
    return runs


def rle_encode(mask: np.ndarray, compress: bool = True) -> dict:
    """(H, W) bool -> COCO RLE ``{"size": [h, w], "counts": "<compressed>"}`` (``compress``
    False: the run lengths as a list)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)  # column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:  # the first run is background, possibly empty
        counts = [0, *counts]
    return {
        "size": [int(mask.shape[0]), int(mask.shape[1])],
        "counts": rle_string(counts) if compress else counts,
    }


def _polygons(polys: list, h: int, w: int) -> np.ndarray:
    # COCO's own rasterization (pycocotools' rleFrPoly): the pixels the annotation tools and the
    # evaluation count. A PIL fill would add the outline: the mask, and so the mask-tight box,
    # one pixel wider and taller than the annotated bbox.
    rles = coco_mask.frPyObjects([[float(v) for v in p] for p in polys], h, w)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def _filled_box(box: Tensor, h: int, w: int) -> np.ndarray:
    x0, y0 = int(np.floor(float(box[0]))), int(np.floor(float(box[1])))
    x1, y1 = max(int(np.ceil(float(box[2]))), x0 + 1), max(int(np.ceil(float(box[3]))), y0 + 1)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def checked_segmentation(seg: Any) -> tuple[Any, int]:
    """(an annotation's ``segmentation`` without its polygons of fewer than 3 points, how many
    were left out): they cover no area, and pycocotools would read a 4-number one as a box. None
    when nothing is left. A ValueError for anything that is neither polygons nor RLE."""
    if seg is None:
        return None, 0
    if isinstance(seg, list) and all(isinstance(p, list) and all(map(is_number, p)) for p in seg):
        polygons = [p for p in seg if len(p) >= 6]
        if all(len(p) % 2 == 0 for p in polygons):
            return polygons or None, len(seg) - len(polygons)
    elif (
        isinstance(seg, dict)
        and isinstance(seg.get("size"), list)
        and len(seg["size"]) == 2
        and isinstance(seg.get("counts"), list | str)
    ):
        rle_runs(seg)  # a broken RLE is named with its file and entry now, not mid-training
        return seg, 0
    raise ValueError(
        "'segmentation' must be polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or "
        "RLE {'size': [h, w], 'counts': [...] or '<compressed>'}"
    )


def segmentation_mask(seg: Any, box: Tensor, h: int, w: int) -> np.ndarray:
    """One annotation's (H, W) bool mask: its segmentation (polygons or RLE) where it covers a
    pixel, else its ``box`` (4,) xyxy pixel edges, filled. A ValueError names what is wrong."""
    mask = None
    if isinstance(seg, list):
        mask = _polygons(seg, h, w)
    elif isinstance(seg, dict):
        mask = rle_decode(seg)
        if mask.shape != (h, w):
            raise ValueError(f"RLE size {list(mask.shape)} but the image is {h}x{w} (HxW)")
    if mask is None or not mask.any():
        mask = _filled_box(box, h, w)
    return mask
