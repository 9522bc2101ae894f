"""GPU data path: the CPU draws the augmentation parameters, the device does the pixel work.

On a GPU the network consumes images faster than CPU workers can crop, resize and colour-jitter
them (issue 5). This module keeps the augmentation *semantics* of the CPU pipeline
(``transforms.build_train_transform`` + ``build_fallbacks``) and moves only the pixels:

1. **Plan on the CPU, with the very same transform objects.** ``GpuPlanDataset`` is the
   ``PennFudanDataset`` whose ``raw`` returns an ``ImageMeta`` instead of the decoded image: a
   ``tv_tensors.Image`` subclass of the right shape with no pixels behind it (an expanded 0-d
   tensor). Its kernels (registered with ``torchvision.transforms.v2.functional.register_kernel``)
   only *record* what they are asked to do (crop, resized_crop, horizontal_flip, resize, the
   photometric adjustments, to_dtype). Every ``make_params`` (RandomChoice branch, the
   SafeBoxCenteredCrop / RandomResizedCrop search, flip, photometric factors), every box
   operation, ``SanitizeBoundingBoxes`` and the dataset's empty-box fallback run unchanged, in
   the same order, on torch's global generator - so for the same seed the boxes are *identical*
   to the CPU path's and the recorded pixel operations are exactly the ones the CPU path applies.
2. **Compile the record** into a ``PixelPlan``: the source rectangle in original pixels, a flip
   flag, and the photometric factors in RandomPhotometricDistort's fixed order (brightness,
   contrast-before, saturation, hue, contrast-after, channel permutation).
3. **Pixel work, batched on the device** (``GpuAugmenter``): the decoded dataset lives on the
   device as one padded ``(N, 3, Hmax, Wmax)`` tensor (170 Penn-Fudan images: ~1.2 GB in fp32);
   ``torchvision.ops.roi_align`` crops and resizes the whole batch to ``(S, S)`` in one call
   (``aligned=True``: boxes in continuous pixel edges, as the dataset's; adaptive sampling
   averages several samples per output pixel, i.e. an antialiased downscale), then the flip and
   the photometric distortion run as batched tensor ops with per-sample factors (identity
   factors where a step was not drawn). Output: ``collate.Batch`` with float images in [0, 1].

Differences to the CPU reference, by design and small: the CPU path works on uint8 (truncating
after every photometric op) and resizes with torchvision's antialiased bilinear filter; the GPU
path works in float with roi_align's box-averaged bilinear samples. Tests bound the difference
(``tests/test_gpu_augment.py``). With ``photometric_after_resize: false`` (the issue's literal
order) contrast's reference mean is the whole source image's grey mean (times any brightness
factor applied before it), since the GPU path always colour-jitters the (S, S) output.

Plugging it in (the DataModule, see the issue-5 report): with ``data.gpu_augment`` on, the train
set is ``GpuPlanDataset`` and its loader uses ``plan_collate`` -> ``PlanBatch`` (boxes, labels,
mask, sizes, names, fallback + the plan tensors; no images). The DataModule's
``on_after_batch_transfer`` hook calls ``GpuAugmenter(batch)`` on the device, which returns the
usual ``Batch``. The LightningModule does not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

# Batched HSV round trip of torchvision's own adjust_hue (private, but the exact same arithmetic).
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from ssd_lightning.data.collate import Batch, collate_fn
from ssd_lightning.data.dataset import PennFudanDataset, load_image

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# ------------------------------------------------------------------------------------------------
# 1. ImageMeta: a pixel-less image whose kernels record the operations
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
        raise NotImplementedError(  # is lost, and with it the GPU plan
            f"gpu_augment: a step before {op[0]!r} has no GPU implementation (e.g. "
            "RandomZoomOut's padding); set data.gpu_augment=false."
        )
    h, w = meta.shape[-2:]
    return make_meta(h if height is None else height, w if width is None else width,
                     (*ops, op))


def _size2(size: Any) -> tuple[int, int]:
    if isinstance(size, int) or len(size) != 2:
        raise NotImplementedError(
            f"gpu_augment: resize to {size!r} (keep-aspect) is not supported; the GPU data path "
            "needs a square (S, S) resize. Set data.gpu_augment=false."
        )
    return int(size[0]), int(size[1])


@F.register_kernel(F.crop, ImageMeta)
def _crop(inpt: ImageMeta, top: int, left: int, height: int, width: int) -> ImageMeta:
    h, w = inpt.shape[-2:]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise NotImplementedError(
            f"gpu_augment: crop {(top, left, height, width)} outside the {h}x{w} canvas "
            "(padding) is not supported. Set data.gpu_augment=false."
        )
    return _with(inpt, ("crop", int(top), int(left), int(height), int(width)), height, width)


@F.register_kernel(F.resized_crop, ImageMeta)
def _resized_crop(inpt: ImageMeta, top: int, left: int, height: int, width: int, size: Any,
                  **kwargs: Any) -> ImageMeta:
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
        raise NotImplementedError(f"gpu_augment: to_dtype({dtype}, scale={scale}) at the end of "
                                  "the pipeline; only float with scale=True is supported.")
    return inpt  # the GPU path always ends as float in [0, 1]


# ------------------------------------------------------------------------------------------------
# 2. PixelPlan: the record compiled to a crop rectangle, a flip and photometric factors
PHOTO_SLOTS = ("brightness", "contrast_before", "saturation", "hue", "contrast_after")
_IDENTITY = {"brightness": 1.0, "contrast_before": 1.0, "saturation": 1.0, "hue": 0.0,
             "contrast_after": 1.0}


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
                raise NotImplementedError(
                    f"gpu_augment: photometric ops {[o[0] for o in ops]} are not in "
                    "RandomPhotometricDistort's order; set data.gpu_augment=false."
                )
            photo[target] = op[1]
            slot = k + 1
        else:  # pragma: no cover - every registered kernel is handled above
            raise NotImplementedError(f"gpu_augment: no GPU implementation of {name!r}")
    return PixelPlan(
        roi=(x0, y0, x1, y1),
        flip=flip,
        out_size=(int(ch), int(cw)),
        photo=tuple(photo[k] for k in PHOTO_SLOTS),
        perm=perm,
        contrast_source=geometry_after_contrast,
    )


# ------------------------------------------------------------------------------------------------
# 3. The dataset that plans, and its collate
class GpuPlanDataset(PennFudanDataset):
    """``PennFudanDataset`` that runs the whole CPU pipeline (transforms + fallbacks) on a
    pixel-less ``ImageMeta``: ``__getitem__`` -> ``(PixelPlan, target)`` with the same boxes,
    labels and fallback stage the CPU path would produce for the same random draws, and
    ``target["index"]`` = the image's position in ``names`` (its row in ``GpuAugmenter``)."""

    def raw(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image, target = super().raw(index)  # decoded once per process (cached); only the size used
        return make_meta(*image.shape[-2:]), target

    def __getitem__(self, index: int) -> tuple[PixelPlan, dict]:
        meta, target = super().__getitem__(index)
        if not isinstance(meta, ImageMeta) or not hasattr(meta, "ops"):
            raise NotImplementedError(
                f"gpu_augment: a step of the augmentation pipeline {self.transforms} has no GPU "
                "implementation (e.g. RandomZoomOut's padding); set data.gpu_augment=false."
            )
        h, w = (int(v) for v in target["orig_size"])
        target["index"] = index
        return compile_ops(meta.ops, h, w), target


@dataclass
class PlanBatch:
    """A training batch before its pixel work: ``collate.Batch`` without ``images`` plus the
    per-sample plan tensors. ``any_hue`` / ``any_contrast_source`` are host-side flags so the
    device never has to be asked (no sync) whether a branch is needed."""

    boxes: Tensor  # (B,G,4) float32 xyxy, network-input pixels [0,S], zero padding
    labels: Tensor  # (B,G) int64
    mask: Tensor  # (B,G) bool
    orig_sizes: Tensor  # (B,2) int64 (height, width)
    names: list[str]
    fallback: Tensor  # (B,) int64
    index: Tensor  # (B,) int64 row of each image in the GpuAugmenter store
    rois: Tensor  # (B,4) float32 xyxy source pixels
    flip: Tensor  # (B,) bool
    photo: Tensor  # (B,5) float32, PHOTO_SLOTS factors
    perm: Tensor  # (B,3) int64 channel order
    contrast_source: Tensor  # (B,) bool
    image_size: tuple[int, int]
    any_hue: bool
    any_contrast_source: bool

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def _map(self, fn) -> PlanBatch:
        return PlanBatch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), Tensor) else v
                            for f in fields(self)})

    def to(self, *args: Any, **kwargs: Any) -> PlanBatch:
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> PlanBatch:  # DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())


def plan_collate(samples: Sequence[tuple[PixelPlan, dict]]) -> PlanBatch:
    """``collate_fn`` for ``GpuPlanDataset`` samples (boxes padded exactly as ``collate_fn``)."""
    sizes = {p.out_size for p, _ in samples}
    if len(sizes) != 1:
        raise ValueError(f"gpu_augment: samples of one batch have different sizes {sizes}")
    base = collate_fn([(torch.zeros(0), t) for _, t in samples])
    plans = [p for p, _ in samples]
    photo = torch.tensor([p.photo for p in plans], dtype=torch.float32)
    csrc = torch.tensor([p.contrast_source for p in plans], dtype=torch.bool)
    return PlanBatch(
        boxes=base.boxes, labels=base.labels, mask=base.mask, orig_sizes=base.orig_sizes,
        names=base.names, fallback=base.fallback,
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


# ------------------------------------------------------------------------------------------------
# 4. Batched pixel work on the device
def _gray(x: Tensor) -> Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma, torchvision's weights."""
    return (x[:, 0:1] * GRAY[0] + x[:, 1:2] * GRAY[1] + x[:, 2:3] * GRAY[2])


def _blend(x: Tensor, y: Tensor, ratio: Tensor) -> Tensor:
    """ratio (B,) per sample: ratio * x + (1 - ratio) * y, clamped to [0, 1] (torchvision's)."""
    r = ratio[:, None, None, None]
    return (x * r + y * (1 - r)).clamp_(0.0, 1.0)


def photometric(x: Tensor, photo: Tensor, perm: Tensor, any_hue: bool = True,
                source_mean: Tensor | None = None) -> Tensor:
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

    def __init__(self, dataset: PennFudanDataset, dtype: torch.dtype | None = None) -> None:
        self.paths = [str(dataset.image_path(n)) for n in dataset.names]
        self.dtype = dtype
        self.store: Tensor | None = None
        self.gray_mean: Tensor | None = None  # (N,) grey mean of each source image in [0, 1]

    def _build(self, device: torch.device) -> None:
        images = [load_image(p) for p in self.paths]  # uint8 (3,H,W), cached per process
        hmax = max(im.shape[1] for im in images)
        wmax = max(im.shape[2] for im in images)
        dtype = self.dtype or torch.float32
        # one spare row/column: each image's last row/column is repeated into it, so roi_align's
        # bilinear samples at the right/bottom edge see the edge (as F.resize does), not padding
        store = torch.zeros(len(images), 3, hmax + 1, wmax + 1, dtype=dtype, device=device)
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
            x = roi_align(self.store, rois.to(self.store.dtype), output_size=plan.image_size,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            x = x.float().div_(255.0).clamp_(0.0, 1.0)
            x = torch.where(plan.flip[:, None, None, None], x.flip(-1), x)
            src = None
            if plan.any_contrast_source:
                b = plan.photo[:, 0]
                own = _gray(x).mean(dim=(1, 2, 3))  # unused where contrast came after geometry
                src = torch.where(plan.contrast_source,
                                  (self.gray_mean[plan.index] * b).clamp(0, 1), own)
            x = photometric(x, plan.photo, plan.perm, plan.any_hue, src)
        return Batch(images=x.contiguous(), boxes=plan.boxes, labels=plan.labels,
                     mask=plan.mask, orig_sizes=plan.orig_sizes, names=plan.names,
                     fallback=plan.fallback)


def build_plan_dataset(root: Any, names: Sequence[str], augmentation: Mapping | None,
                       image_size: int) -> GpuPlanDataset:
    """The GPU-path twin of the DataModule's train set (same transforms and fallbacks)."""
    from ssd_lightning.data.transforms import build_fallbacks, build_train_transform

    return GpuPlanDataset(root, names, transforms=build_train_transform(augmentation, image_size),
                          fallbacks=build_fallbacks(augmentation, image_size), skip_empty=True)


def gpu_augment_enabled(option: bool | str | None, accelerator_is_gpu: bool) -> bool:
    """``data.gpu_augment``: true | false | auto (= on when the trainer runs on a GPU)."""
    if option in (None, "auto"):
        return accelerator_is_gpu
    if isinstance(option, bool):
        return option
    raise ValueError(f"data.gpu_augment={option!r}: allowed values are true, false, auto")


__all__ = [
    "GpuAugmenter",
    "GpuPlanDataset",
    "ImageMeta",
    "PixelPlan",
    "PlanBatch",
    "build_plan_dataset",
    "compile_ops",
    "gpu_augment_enabled",
    "make_meta",
    "photometric",
    "plan_collate",
]
