"""Stage 1 of the GPU data path: ``ImageMeta``, a pixel-less image that records its operations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F


class NoGpuKernel(NotImplementedError):
    """A pipeline step has no recording kernel: the GPU data path cannot plan this pipeline."""


class ImageMeta(tv_tensors.Image):
    """A ``(3, H, W)`` uint8 ``Image`` without pixels (stride-0 view of one zero) that carries the
    list of pixel operations applied to it (``ops``: tuples ``(name, *args)``)."""

    ops: tuple


def make_meta(height: int, width: int, ops: tuple = ()) -> ImageMeta:
    meta = torch.zeros((), dtype=torch.uint8).expand(3, int(height), int(width))
    meta = meta.as_subclass(ImageMeta)
    meta.ops = tuple(ops)
    return meta


def _with(meta: ImageMeta, op: tuple, height: int | None = None, width: int | None = None):
    ops = getattr(meta, "ops", None)
    if ops is None:  # an op without a recording kernel (e.g. F.pad) ran on it before: its record
        raise NoGpuKernel(  # is lost, and with it the GPU plan
            f"gpu_augment: a step before {op[0]!r} has no GPU implementation (e.g. "
            "RandomZoomOut's padding); set data.gpu_augment=false."
        )
    h, w = meta.shape[-2:]
    return make_meta(h if height is None else height, w if width is None else width, (*ops, op))


def _size2(size: Any) -> tuple[int, int]:
    if isinstance(size, int) or len(size) != 2:
        raise NoGpuKernel(
            f"gpu_augment: resize to {size!r} (keep-aspect) is not supported; the GPU data path "
            "needs a square (S, S) resize. Set data.gpu_augment=false."
        )
    return int(size[0]), int(size[1])


@F.register_kernel(F.crop, ImageMeta)
def _crop(inpt: ImageMeta, top: int, left: int, height: int, width: int) -> ImageMeta:
    h, w = inpt.shape[-2:]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise NoGpuKernel(
            f"gpu_augment: crop {(top, left, height, width)} outside the {h}x{w} canvas "
            "(padding) is not supported. Set data.gpu_augment=false."
        )
    return _with(inpt, ("crop", int(top), int(left), int(height), int(width)), height, width)


@F.register_kernel(F.resized_crop, ImageMeta)
def _resized_crop(
    inpt: ImageMeta, top: int, left: int, height: int, width: int, size: Any, **kwargs: Any
) -> ImageMeta:
    out = _crop(inpt, top, left, height, width)
    return _resize(out, size)


@F.register_kernel(F.resize, ImageMeta)
def _resize(inpt: ImageMeta, size: Any, *args: Any, **kwargs: Any) -> ImageMeta:
    h, w = _size2(size)
    return _with(inpt, ("resize", h, w), h, w)


@F.register_kernel(F.horizontal_flip, ImageMeta)
def _hflip(inpt: ImageMeta) -> ImageMeta:
    return _with(inpt, ("hflip",))


@F.register_kernel(F.adjust_brightness, ImageMeta)
def _brightness(inpt: ImageMeta, brightness_factor: float) -> ImageMeta:
    return _with(inpt, ("brightness", float(brightness_factor)))


@F.register_kernel(F.adjust_contrast, ImageMeta)
def _contrast(inpt: ImageMeta, contrast_factor: float) -> ImageMeta:
    return _with(inpt, ("contrast", float(contrast_factor)))


@F.register_kernel(F.adjust_saturation, ImageMeta)
def _saturation(inpt: ImageMeta, saturation_factor: float) -> ImageMeta:
    return _with(inpt, ("saturation", float(saturation_factor)))


@F.register_kernel(F.adjust_hue, ImageMeta)
def _hue(inpt: ImageMeta, hue_factor: float) -> ImageMeta:
    return _with(inpt, ("hue", float(hue_factor)))


@F.register_kernel(F.permute_channels, ImageMeta)
def _permute(inpt: ImageMeta, permutation: Sequence[int]) -> ImageMeta:
    return _with(inpt, ("permute", tuple(int(p) for p in permutation)))


@F.register_kernel(F.to_dtype, ImageMeta)
def _to_dtype(inpt: ImageMeta, dtype: torch.dtype = torch.float32, scale: bool = False):
    if not (dtype.is_floating_point and scale):
        raise NoGpuKernel(
            f"gpu_augment: to_dtype({dtype}, scale={scale}) at the end of "
            "the pipeline; only float with scale=True is supported."
        )
    return inpt  # the GPU path always ends as float in [0, 1]
