"""Stage 3 of the GPU data path: the batched pixel work on the device (``GpuAugmenter``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

# Batched HSV round trip of torchvision's own adjust_hue (private, but the exact same arithmetic).
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from ssd_lightning.data.batch import Batch, PlanBatch
from ssd_lightning.data.dataset import DetectionDataset

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: Tensor) -> Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma, torchvision's weights."""
    return x[:, 0:1] * GRAY[0] + x[:, 1:2] * GRAY[1] + x[:, 2:3] * GRAY[2]


def _blend(x: Tensor, y: Tensor, ratio: Tensor) -> Tensor:
    """ratio (B,) per sample: ratio * x + (1 - ratio) * y, clamped to [0, 1] (torchvision's)."""
    r = ratio[:, None, None, None]
    return (x * r + y * (1 - r)).clamp_(0.0, 1.0)


def photometric(
    x: Tensor, photo: Tensor, perm: Tensor, any_hue: bool = True, source_mean: Tensor | None = None
) -> Tensor:
    """RandomPhotometricDistort with per-sample factors on float images in [0, 1].

    x (B,3,H,W); photo (B,5) PHOTO_SLOTS factors (identity = not drawn, which leaves the image
    bit-exact); perm (B,3); source_mean (B,) optional grey means replacing the image's own for
    the contrast-before step (contrast applied before the geometry). Same order and formulas as
    torchvision's float kernels.
    """
    b, cb, s, h, ca = photo.unbind(1)
    x = (x * b[:, None, None, None]).clamp_(0.0, 1.0)
    mean = _gray(x).mean(dim=(1, 2, 3))
    if source_mean is not None:
        mean = source_mean
    x = _blend(x, mean[:, None, None, None], cb)
    x = _blend(x, _gray(x), s)
    if any_hue:
        hsv = _rgb_to_hsv(x)
        hue = (hsv[:, 0] + h[:, None, None]).remainder(1.0)
        shifted = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], 1))
        x = torch.where((h != 0)[:, None, None, None], shifted, x)
    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), ca)
    return x.gather(1, perm[:, :, None, None].expand_as(x))


class GpuAugmenter:
    """The decoded training images held on one device, and the batched pixel work.

    ``store`` (N, 3, Hmax+1, Wmax+1): the images top-left aligned, values 0..255, fp32 by
    default (Penn-Fudan: ~1.2 GB). fp16 would halve that and is exact for the pixel values, but
    roi_align wants its boxes in the input's dtype, and fp16 coordinates near 1000 px are only
    0.5 px apart - so fp32. Built lazily on the first batch's device.
    """

    def __init__(self, dataset: DetectionDataset, dtype: torch.dtype | None = None) -> None:
        self.dataset = dataset
        self.dtype = dtype
        self.store: Tensor | None = None
        self.gray_mean: Tensor | None = None  # (N,) grey mean of each source image in [0, 1]

    def _store_shape(self, images: list[Tensor]) -> tuple[int, int, int, int]:
        # one spare row/column: each image's last row/column is repeated into it, so roi_align's
        # bilinear samples at the right/bottom edge see the edge (as F.resize does), not padding
        hmax = max(im.shape[1] for im in images)
        wmax = max(im.shape[2] for im in images)
        return len(images), 3, hmax + 1, wmax + 1

    def store_bytes(self) -> int:
        """The size of ``store`` (the images are decoded for their sizes: cached ones are not
        decoded again)."""
        images = [self.dataset.image(i) for i in range(len(self.dataset))]
        return math.prod(self._store_shape(images)) * (self.dtype or torch.float32).itemsize

    def _build(self, device: torch.device) -> None:
        images = [self.dataset.image(i) for i in range(len(self.dataset))]  # uint8, cached
        dtype = self.dtype or torch.float32
        store = torch.zeros(self._store_shape(images), dtype=dtype, device=device)
        means = []
        for i, im in enumerate(images):  # once per run, not per step
            h, w = im.shape[1:]
            im = im.to(device).to(dtype)
            store[i, :, :h, :w] = im
            store[i, :, :h, w] = im[:, :, -1]
            store[i, :, h, : w + 1] = store[i, :, h - 1, : w + 1]
            means.append(_gray(im[None].float() / 255).mean())
        self.store, self.gray_mean = store, torch.stack(means)

    def __call__(self, plan: PlanBatch) -> Batch:
        """PlanBatch on the device -> Batch with images (B,3,S,S) float32 in [0,1]."""
        device = plan.rois.device
        if self.store is None or self.store.device != device:
            self._build(device)
        assert self.store is not None and self.gray_mean is not None
        with torch.no_grad():
            rois = torch.cat([plan.index[:, None].to(plan.rois), plan.rois], 1)  # (B,5)
            x = roi_align(
                self.store,
                rois.to(self.store.dtype),
                output_size=plan.image_size,
                spatial_scale=1.0,
                sampling_ratio=-1,
                aligned=True,
            )
            x = x.float().div_(255.0).clamp_(0.0, 1.0)
            x = torch.where(plan.flip[:, None, None, None], x.flip(-1), x)
            src = None
            if plan.any_contrast_source:
                b = plan.photo[:, 0]
                own = _gray(x).mean(dim=(1, 2, 3))  # unused where contrast came after geometry
                src = torch.where(
                    plan.contrast_source, (self.gray_mean[plan.index] * b).clamp(0, 1), own
                )
            x = photometric(x, plan.photo, plan.perm, plan.any_hue, src)
        return Batch(
            images=x.contiguous(),
            boxes=plan.boxes,
            labels=plan.labels,
            mask=plan.mask,
            orig_sizes=plan.orig_sizes,
            names=plan.names,
            fallback=plan.fallback,
            crowd=plan.crowd,
        )
