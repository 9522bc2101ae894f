"""Training batches: ``Batch`` (the DEVELOPERS.md contract), ``PlanBatch`` (the GPU data path's
batch before its pixel work), and their collates.

Boxes are padded to the largest count G in the batch (G >= 1) with a validity mask, so the
batched matcher needs no per-image loop. Box format: xyxy in network-input pixels [0, S].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Self

import torch
from torch import Tensor

from ssd_lightning.data.gpu.plan import PHOTO_SLOTS, PixelPlan


@dataclass
class TargetBatch:
    """What every training batch holds besides pixels; Lightning moves it with ``to``."""

    boxes: Tensor  # (B,G,4) float32 xyxy, network-input pixels [0,S], zero padding
    labels: Tensor  # (B,G) int64, 1.. = class, 0 in padding
    mask: Tensor  # (B,G) bool, True = real box
    orig_sizes: Tensor  # (B,2) int64 (height, width) of the original image
    names: list[str]  # file names
    fallback: Tensor  # (B,) int64: 0 none, 1 re-run without crop, 2 resize-only largest box
    # (B,G) bool, True = a crowd region (COCO iscrowd; evaluation batches only): no training
    # target, and neither a hit nor a miss in the mAP. None: no crowd in the batch
    crowd: Tensor | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        return type(self)(
            **{
                f.name: fn(v) if isinstance(v := getattr(self, f.name), Tensor) else v
                for f in fields(self)
            }
        )

    def to(self, *args: Any, **kwargs: Any) -> Self:
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> Self:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())


@dataclass
class Batch(TargetBatch):
    images: Tensor  # (B,3,S,S) float32 in [0,1]


@dataclass
class PlanBatch(TargetBatch):
    """The GPU data path's batch: targets plus each sample's pixel plan, no images.
    ``any_hue`` / ``any_contrast_source`` are host-side flags, so the device is never asked (a
    sync) whether a branch is needed."""

    index: Tensor  # (B,) int64 row of each image in the GpuAugmenter store
    rois: Tensor  # (B,4) float32 xyxy source pixels
    flip: Tensor  # (B,) bool
    photo: Tensor  # (B,5) float32, PHOTO_SLOTS factors
    perm: Tensor  # (B,3) int64 channel order
    contrast_source: Tensor  # (B,) bool
    image_size: tuple[int, int]
    any_hue: bool
    any_contrast_source: bool


def _targets(samples: Sequence[tuple[Any, dict]]) -> dict[str, Any]:
    """The TargetBatch fields of a list of (anything, target) samples."""
    b = len(samples)
    counts = [len(t["boxes"]) for _, t in samples]
    g = max(1, *counts) if counts else 1
    boxes = torch.zeros(b, g, 4)
    labels = torch.zeros(b, g, dtype=torch.int64)
    for i, (_, t) in enumerate(samples):  # once per batch in the worker, not a hot path
        boxes[i, : counts[i]] = t["boxes"].as_subclass(Tensor)
        labels[i, : counts[i]] = t["labels"]
    return {
        "boxes": boxes,
        "labels": labels,
        "mask": torch.arange(g)[None, :] < torch.tensor(counts)[:, None],
        "orig_sizes": torch.stack(
            [torch.as_tensor(t["orig_size"], dtype=torch.int64) for _, t in samples]
        ),
        "names": [t["name"] for _, t in samples],
        "fallback": torch.tensor([int(t.get("fallback", 0)) for _, t in samples]),
        "crowd": _crowd(samples, g),
    }


def _crowd(samples: Sequence[tuple[Any, dict]], g: int) -> Tensor | None:
    """(B,G) bool crowd flags padded like the boxes, or None when no sample has any."""
    if not any("crowd" in t and bool(t["crowd"].any()) for _, t in samples):
        return None
    crowd = torch.zeros(len(samples), g, dtype=torch.bool)
    for i, (_, t) in enumerate(samples):
        if "crowd" in t:
            crowd[i, : len(t["crowd"])] = t["crowd"]
    return crowd


def collate_fn(samples: Sequence[tuple[Tensor, dict]]) -> Batch:
    """Stack `(image (3,S,S) float, target)` samples (all images the same size) into a Batch."""
    images = torch.stack([img.as_subclass(Tensor) for img, _ in samples])
    return Batch(images=images, **_targets(samples))


def plan_collate(samples: Sequence[tuple[PixelPlan, dict]]) -> PlanBatch:
    """Collate for the GPU data path's `(PixelPlan, target)` samples (boxes padded as
    ``collate_fn`` pads them)."""
    sizes = {p.out_size for p, _ in samples}
    if len(sizes) != 1:
        raise ValueError(f"gpu_augment: samples of one batch have different sizes {sizes}")
    plans = [p for p, _ in samples]
    photo = torch.tensor([p.photo for p in plans], dtype=torch.float32)
    csrc = torch.tensor([p.contrast_source for p in plans], dtype=torch.bool)
    return PlanBatch(
        **_targets(samples),
        index=torch.tensor([int(t["index"]) for _, t in samples], dtype=torch.int64),
        rois=torch.tensor([p.roi for p in plans], dtype=torch.float32),
        flip=torch.tensor([p.flip for p in plans], dtype=torch.bool),
        photo=photo,
        perm=torch.tensor([p.perm for p in plans], dtype=torch.int64),
        contrast_source=csrc,
        image_size=sizes.pop(),
        any_hue=bool((photo[:, PHOTO_SLOTS.index("hue")] != 0).any()),
        any_contrast_source=bool(csrc.any()),
    )
