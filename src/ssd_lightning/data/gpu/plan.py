"""Stage 2 of the GPU data path: recorded operations -> ``PixelPlan``, and the dataset that
plans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset
from torchvision.transforms import v2

from ssd_lightning.data.dataset import DetectionDataset
from ssd_lightning.data.gpu.record import ImageMeta, NoGpuKernel, make_meta
from ssd_lightning.data.transforms import (
    BoundedRandomIoUCrop,
    ResizeKeepLargest,
    SafeBoxCenteredCrop,
    TightBoxes,
)

# Steps whose pixel work the recording kernels cover (the rest of a pipeline only moves boxes).
_PLANNABLE = (
    v2.ToImage,
    v2.RandomPhotometricDistort,
    v2.RandomResizedCrop,
    v2.RandomHorizontalFlip,
    v2.Resize,
    v2.SanitizeBoundingBoxes,
    v2.ToDtype,
    v2.Identity,
    SafeBoxCenteredCrop,
    BoundedRandomIoUCrop,
    ResizeKeepLargest,
    TightBoxes,
)
_CONTAINERS = (v2.Compose, v2.RandomChoice, v2.RandomApply, v2.RandomOrder)


def unplannable_steps(transform: Any) -> list[str]:
    """Names of the steps of a pipeline the GPU data path cannot plan (e.g. RandomZoomOut,
    whose padding has no recording kernel); [] when the whole pipeline can run on it."""
    if isinstance(transform, _CONTAINERS):
        return [name for t in transform.transforms for name in unplannable_steps(t)]
    return [] if isinstance(transform, _PLANNABLE) else [type(transform).__name__]


PHOTO_SLOTS = ("brightness", "contrast_before", "saturation", "hue", "contrast_after")
_IDENTITY = {
    "brightness": 1.0,
    "contrast_before": 1.0,
    "saturation": 1.0,
    "hue": 0.0,
    "contrast_after": 1.0,
}


@dataclass
class PixelPlan:
    """The pixel work of one sample. ``roi`` (4,) xyxy in original image pixels (continuous edges)
    maps to the (S, S) output, mirrored first if ``flip``; ``photo`` holds the factors of
    PHOTO_SLOTS (identity when not drawn); ``perm`` the channel order; ``contrast_source``: the
    contrast reference is the source image's grey mean (contrast applied before the geometry)."""

    roi: tuple[float, float, float, float]
    flip: bool
    out_size: tuple[int, int]
    photo: tuple[float, ...]
    perm: tuple[int, int, int] = (0, 1, 2)
    contrast_source: bool = False


def compile_ops(ops: Sequence[tuple], height: int, width: int) -> PixelPlan:
    """Recorded ops of one sample, applied to an (height, width) source -> its PixelPlan."""
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)  # current canvas in source pixels
    ch, cw = float(height), float(width)  # current canvas size
    flip = False
    photo = dict(_IDENTITY)
    perm = (0, 1, 2)
    slot = 0  # photometric ops must come in RandomPhotometricDistort's order
    geometry_after_contrast = False
    contrast_seen = False
    for op in ops:
        name = op[0]
        if name == "crop":
            _, top, left, h, w = op
            u0, u1 = left / cw, (left + w) / cw
            v0, v1 = top / ch, (top + h) / ch
            sw, sh = x1 - x0, y1 - y0
            if flip:
                x0, x1 = x1 - u1 * sw, x1 - u0 * sw
            else:
                x0, x1 = x0 + u0 * sw, x0 + u1 * sw
            y0, y1 = y0 + v0 * sh, y0 + v1 * sh
            ch, cw = float(h), float(w)
            geometry_after_contrast |= contrast_seen
        elif name == "resize":
            ch, cw = float(op[1]), float(op[2])
            geometry_after_contrast |= contrast_seen
        elif name == "hflip":
            flip = not flip
        elif name == "permute":
            perm = tuple(perm[p] for p in op[1])
            slot = len(PHOTO_SLOTS)
        elif name in ("brightness", "contrast", "saturation", "hue"):
            if name == "contrast":
                target = "contrast_before" if slot <= 1 else "contrast_after"
                contrast_seen = True
            else:
                target = name
            k = PHOTO_SLOTS.index(target)
            if k < slot or photo[target] != _IDENTITY[target]:
                raise NoGpuKernel(
                    f"gpu_augment: photometric ops {[o[0] for o in ops]} are not in "
                    "RandomPhotometricDistort's order; set data.gpu_augment=false."
                )
            photo[target] = op[1]
            slot = k + 1
        else:  # pragma: no cover - every registered kernel is handled above
            raise NoGpuKernel(f"gpu_augment: no GPU implementation of {name!r}")
    return PixelPlan(
        roi=(x0, y0, x1, y1),
        flip=flip,
        out_size=(int(ch), int(cw)),
        photo=tuple(photo[k] for k in PHOTO_SLOTS),
        perm=perm,
        contrast_source=geometry_after_contrast,
    )


class GpuPlanDataset(Dataset):
    """The CPU side of the GPU data path around a ``DetectionDataset``: each sample runs that
    dataset's whole pipeline (transforms + fallbacks, the very same objects) on a pixel-less
    ``ImageMeta`` -> ``(PixelPlan, target)`` with the boxes, labels and fallback stage the CPU
    path produces for the same random draws; ``target["index"]`` is the sample's index (its row
    in ``GpuAugmenter``)."""

    def __init__(self, dataset: DetectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[PixelPlan, dict]:
        image, target = self.dataset.raw(index)  # decoded once per process (cached): size only
        meta, target = self.dataset.apply(make_meta(*image.shape[-2:]), target, index)
        if not isinstance(meta, ImageMeta) or not hasattr(meta, "ops"):
            raise NoGpuKernel(
                f"gpu_augment: a step of the augmentation pipeline {self.dataset.transforms} has "
                "no GPU implementation (e.g. RandomZoomOut's padding); set data.gpu_augment=false."
            )
        h, w = (int(v) for v in target["orig_size"])
        target["index"] = index
        return compile_ops(meta.ops, h, w), target
