"""Detection datasets: ``DetectionDataset`` (the augmentation and empty-box fallback around a
``raw`` sample) and ``PennFudanDataset`` (Penn-Fudan images, boxes from the instance masks).

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8 (3,H,W) RGB without
transforms), ``target`` a dict with ``boxes`` (``tv_tensors.BoundingBoxes`` XYXY, pixels of the
returned image, ``canvas_size`` set), ``labels`` (G,) int64 (1 = pedestrian), optional
``mask_runs`` (``mask_runs.MaskRuns``: the instance masks, which the augmentation's ``TightBoxes``
turns into boxes around what a crop left visible; a sample without them keeps the boxes the
geometry gives), ``orig_size`` (2,) int64 (height, width) of the file, ``name`` (file name) and
``fallback`` (0/1/2, see ``DetectionDataset.apply``).

Pixel convention: ``masks_to_boxes`` returns the *inclusive* last pixel index as x2/y2; we add 1
so boxes use continuous pixel edges (pixel i spans [i, i+1)): a one-pixel instance has width 1,
boxes lie in [0, W] x [0, H], and resizing scales them exactly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from ssd_lightning.config.errors import DataError
from ssd_lightning.data.images import InputError, read_rgb
from ssd_lightning.data.manifest import IMAGE_DIR, MASK_DIR, list_image_names, mask_name
from ssd_lightning.data.mask_runs import MaskRuns, mask_runs

PEDESTRIAN = 1
CLASS_NAMES = ("background", "pedestrian")  # index = label
Transform = Callable[[tv_tensors.Image, dict], tuple[tv_tensors.Image, dict]]


class DatasetReadError(DataError, RuntimeError):
    """An image or mask file could not be read or does not fit its partner."""


def _file_key(path: str) -> tuple[str, int, int]:
    # cache key: a file replaced on disk is decoded again
    try:
        st = Path(path).stat()
    except OSError as e:
        raise DatasetReadError(f"cannot read {path}: {e}") from e
    return path, st.st_mtime_ns, st.st_size


def load_image(path: str, exif_transpose: bool = False) -> Tensor:
    """Decoded uint8 (3,H,W) RGB image (grayscale/RGBA/palette converted), cached per process.
    By default the pixels as stored (Penn-Fudan's masks are aligned to them); ``exif_transpose``:
    as displayed, the EXIF orientation applied."""
    return _cached_image(*_file_key(path), exif_transpose)


@functools.cache
def _cached_image(path: str, mtime_ns: int, size: int, exif_transpose: bool) -> Tensor:
    try:
        return read_rgb(path, exif_transpose=exif_transpose)
    except InputError as e:
        raise DatasetReadError(f"image file {e}") from e


def _load_mask(path: Path) -> Tensor:
    try:
        with Image.open(path) as im:
            mask = torch.from_numpy(np.array(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetReadError(f"cannot read mask file {path}: {e}") from e
    if mask.ndim != 2:
        raise DatasetReadError(
            f"mask file {path} must be single-channel (instance ids), got {tuple(mask.shape)}"
        )
    return mask.long()


def _instance_masks(path: Path) -> tuple[Tensor, Tensor]:
    """(ids (G,) int64 ascending, masks (G, H, W) bool) of a mask file of instance ids."""
    mask = _load_mask(path)
    ids = torch.unique(mask)
    ids = ids[ids > 0]
    return ids, mask[None] == ids[:, None, None]


def check_mask_size(
    mask: Path, mask_hw: tuple[int, int], image: Path, image_hw: tuple[int, int]
) -> None:
    """Boxes from a mask of another size than its image would be at the wrong scale."""
    if tuple(mask_hw) != tuple(image_hw):
        raise DatasetReadError(
            f"mask {mask} is {mask_hw[0]}x{mask_hw[1]} (HxW) but image {image} is "
            f"{image_hw[0]}x{image_hw[1]}"
        )


def header_boxes(image: Path, mask: Path) -> tuple[Tensor, tuple[int, int]]:
    """(boxes (G, 4) float32 xyxy pixel edges, (height, width)) of an image from its mask file
    and its header (no pixel decode), the two sizes checked."""
    try:
        with Image.open(image) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetReadError(f"image file {image}: cannot read it as an image ({e})") from e
    boxes, _, mask_hw = load_instances(str(mask))
    check_mask_size(mask, mask_hw, image, (h, w))
    return boxes, (h, w)


def load_instances(path: str) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """(boxes (G,4) float32 xyxy pixel edges, ids (G,) int64, (height, width) of the mask) of a
    mask file, cached per process."""
    return _cached_instances(*_file_key(path))


@functools.cache
def _cached_instances(
    path: str, mtime_ns: int, size: int
) -> tuple[Tensor, Tensor, tuple[int, int]]:
    ids, masks = _instance_masks(Path(path))
    hw = (int(masks.shape[1]), int(masks.shape[2]))
    if len(ids) == 0:
        return torch.zeros(0, 4), ids, hw
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # inclusive last pixel -> exclusive edge
    return boxes, ids, hw


@functools.cache
def _cached_runs(path: str, mtime_ns: int, size: int) -> MaskRuns:
    """The instances of a mask file as ``MaskRuns`` (in the order of ``load_instances``)."""
    return mask_runs(_instance_masks(Path(path))[1])


class DetectionDataset(Dataset):
    """Samples ``raw(index)`` run through ``transforms``, with the empty-box fallback.

    transforms: callable ``(image, {"boxes", "labels"[, "mask_runs"]}) -> (image, target)``.
    fallbacks: tried in order when `transforms` leaves a sample that had boxes with none; the
        stage that produced the sample (1-based, 0 = none) is returned as ``target["fallback"]``.
    Subclasses set ``names`` and implement ``image`` and ``raw``.
    """

    names: list[str]

    def __init__(self, transforms: Transform | None = None, fallbacks: Sequence[Transform] = ()):
        self.transforms = transforms
        self.fallbacks = list(fallbacks)

    def image(self, index: int) -> Tensor:
        """The decoded image, uint8 (3, H, W) RGB."""
        raise NotImplementedError

    def raw(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """The untransformed sample: uint8 image and boxes in its pixels."""
        raise NotImplementedError

    def preload(self) -> None:
        """Read every raw sample now (e.g. in the main process before DataLoader workers fork, so
        they inherit the decoded images and masks)."""
        for index in range(len(self)):
            self.raw(index)

    def __len__(self) -> int:
        return len(self.names)

    def apply(self, image: tv_tensors.Image, target: dict, index: int) -> tuple[Any, dict]:
        """``transforms`` (then the fallbacks while a sample that had boxes has none) on one raw
        sample, plus ``orig_size``, ``name`` and ``fallback``. ``image`` may be any tensor the
        transforms accept (the GPU data path passes a pixel-less one)."""
        h, w = image.shape[-2:]
        had_boxes = len(target["boxes"]) > 0
        out_img, out_t, stage = image, target, 0
        if self.transforms is not None:
            out_img, out_t = self.transforms(image, target)
            for stage_no, fb in enumerate(self.fallbacks, start=1):
                if not had_boxes or len(out_t["boxes"]) > 0:
                    break
                out_img, out_t = fb(image, target)
                stage = stage_no
        out_t = dict(out_t)
        out_t["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        out_t["name"] = self.names[index]
        out_t["fallback"] = stage
        return out_img, out_t

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        return self.apply(*self.raw(index), index)


class PennFudanDataset(DetectionDataset):
    """Penn-Fudan samples for the given image file names (default: all under `root/PNGImages`).

    skip_empty: leave out (with a warning) images whose mask has no instance — for training.
    with_masks: add the instance masks to the target (``mask_runs``), for augmentation presets
        with ``tight_boxes``; evaluation, whose boxes are not augmented, needs none.
    """

    def __init__(
        self,
        root: str | Path,
        names: Sequence[str] | None = None,
        transforms: Transform | None = None,
        fallbacks: Sequence[Transform] = (),
        skip_empty: bool = False,
        with_masks: bool = False,
    ) -> None:
        super().__init__(transforms, fallbacks)
        self.root = Path(root)
        names = list(list_image_names(self.root) if names is None else names)
        if not names:
            raise DatasetReadError(f"no images found under {self.root / IMAGE_DIR}")
        self.with_masks = with_masks
        self.empty: list[str] = [n for n in names if len(self._instances(n)[0]) == 0]
        if self.empty and skip_empty:
            warnings.warn(
                f"{len(self.empty)} image(s) under {self.root} have no pedestrian in their mask "
                f"and are left out of training: {', '.join(self.empty)}",
                stacklevel=2,
            )
            names = [n for n in names if n not in set(self.empty)]
        self.names = names

    def image_path(self, name: str) -> Path:
        return self.root / IMAGE_DIR / name

    def mask_path(self, name: str) -> Path:
        return self.root / MASK_DIR / mask_name(name)

    def _instances(self, name: str) -> tuple[Tensor, Tensor, tuple[int, int]]:
        return load_instances(str(self.mask_path(name)))

    def image(self, index: int) -> Tensor:
        return load_image(str(self.image_path(self.names[index])))

    def raw(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """The untransformed sample: uint8 image and boxes in original pixels."""
        name = self.names[index]
        img = self.image(index)
        key = _file_key(str(self.mask_path(name)))  # one stat for the boxes and the runs
        boxes, _, mask_hw = _cached_instances(*key)
        h, w = img.shape[-2:]
        check_mask_size(self.mask_path(name), mask_hw, self.image_path(name), (h, w))
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(h, w)),
            "labels": torch.full((len(boxes),), PEDESTRIAN, dtype=torch.int64),
        }
        if self.with_masks:  # a copy, as for the boxes: the cache is shared by every draw
            target["mask_runs"] = _cached_runs(*key).copy()
        return tv_tensors.Image(img), target
