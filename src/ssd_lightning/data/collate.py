"""`Batch` (the DEVELOPERS.md contract) and `collate_fn` for dataset samples.

Boxes are padded to the largest count G in the batch (G >= 1) with a validity mask, so the
batched matcher needs no per-image loop. Box format: xyxy in network-input pixels [0, S].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    images: Tensor  # (B,3,S,S) float32 in [0,1]
    boxes: Tensor  # (B,G,4) float32 xyxy, network-input pixels [0,S], zero padding
    labels: Tensor  # (B,G) int64, 1 = pedestrian, 0 in padding
    mask: Tensor  # (B,G) bool, True = real box
    orig_sizes: Tensor  # (B,2) int64 (height, width) of the original image
    names: list[str]  # file names
    fallback: Tensor  # (B,) int64: 0 none, 1 re-run without crop, 2 resize-only largest box

    def __len__(self) -> int:
        return self.images.shape[0]

    def _map(self, fn) -> Batch:
        return Batch(
            **{
                f.name: fn(v) if isinstance(v := getattr(self, f.name), Tensor) else v
                for f in fields(self)
            }
        )

    def to(self, *args, **kwargs) -> Batch:
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())


def collate_fn(samples: Sequence[tuple[Tensor, dict]]) -> Batch:
    """Stack `(image (3,S,S) float, target)` samples (all images the same size) into a Batch."""
    b = len(samples)
    counts = [len(t["boxes"]) for _, t in samples]
    g = max(1, *counts) if counts else 1
    boxes = torch.zeros(b, g, 4)
    labels = torch.zeros(b, g, dtype=torch.int64)
    for i, (_, t) in enumerate(
        samples
    ):  # collate runs once per batch in the worker, not a hot path
        n = counts[i]
        boxes[i, :n] = t["boxes"].as_subclass(Tensor)
        labels[i, :n] = t["labels"]
    mask = torch.arange(g)[None, :] < torch.tensor(counts)[:, None]
    return Batch(
        images=torch.stack([img.as_subclass(Tensor) for img, _ in samples]),
        boxes=boxes,
        labels=labels,
        mask=mask,
        orig_sizes=torch.stack(
            [torch.as_tensor(t["orig_size"], dtype=torch.int64) for _, t in samples]
        ),
        names=[t["name"] for _, t in samples],
        fallback=torch.tensor([int(t.get("fallback", 0)) for _, t in samples], dtype=torch.int64),
    )
