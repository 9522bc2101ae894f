"""``CocoDataset``: the images of one COCO annotation file (``data.coco.read_coco``) as
``DetectionDataset`` samples, and the instance masks of an image's annotations
(``instance_masks``; the decoding is ``data.segmentation``'s).

An image is read in the orientation it was annotated in (a photo's EXIF orientation applied, as
labelling tools display it, unless only the stored pixels have the entry's width and height).
``iscrowd`` annotations are left out of training and kept, flagged, for the evaluation (COCO's
rule: a detection on a crowd region is neither a hit nor a false positive). Segmentations
(polygons or RLE) become the instance masks of the mask-tight boxes, as Penn-Fudan's mask files
do (``mask_runs.MaskRuns``); an annotation without one gets its box, filled.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors

from ssd_lightning.data.coco import CocoAnnotations, CocoFormatError, CocoImage
from ssd_lightning.data.dataset import DatasetReadError, DetectionDataset, Transform, load_image
from ssd_lightning.data.mask_runs import MaskRuns, mask_runs
from ssd_lightning.data.segmentation import segmentation_mask


def instance_masks(entry: CocoImage, keep: Tensor, source: Path) -> Tensor:
    """(G, H, W) bool masks of the kept annotations: the segmentation where there is one (and it
    covers a pixel), else the box, filled."""
    h, w = entry.height, entry.width
    out = []
    for i in keep.nonzero().flatten().tolist():
        where = f"{source}: annotation id {entry.ann_ids[i]} of image {entry.file_name}"
        try:
            mask = segmentation_mask(entry.segmentations[i], entry.boxes[i], h, w)
        except (ValueError, TypeError) as e:
            raise CocoFormatError(f"{where}: unreadable segmentation ({e})") from e
        out.append(torch.from_numpy(mask))
    return torch.stack(out) if out else torch.zeros(0, h, w, dtype=torch.bool)


class CocoDataset(DetectionDataset):
    """The images of one COCO annotation file (``indices`` into ``annotations.images``, default
    all), as ``DetectionDataset`` samples.

    train: leave crowd annotations out and skip (with a warning) images without a box; otherwise
        crowd boxes stay, flagged in ``target["crowd"]`` (G,) bool, for the evaluation.
    with_masks: add the instance masks (``mask_runs``) where the file has segmentations, for
        augmentation presets with ``tight_boxes``.
    """

    def __init__(
        self,
        annotations: CocoAnnotations,
        indices: Sequence[int] | None = None,
        transforms: Transform | None = None,
        fallbacks: Sequence[Transform] = (),
        train: bool = False,
        with_masks: bool = False,
    ) -> None:
        super().__init__(transforms, fallbacks)
        self.annotations = annotations
        self.root = annotations.images_dir
        every = range(len(annotations.images)) if indices is None else indices
        entries = [annotations.images[i] for i in every]
        if not entries:
            raise CocoFormatError(f"{annotations.path}: an empty dataset (no images to use)")
        self.train = train
        self.with_masks = with_masks and annotations.has_segmentations
        if train:
            empty = [e.file_name for e in entries if not bool((~e.crowd).any())]
            if empty:
                warnings.warn(
                    f"{len(empty)} image(s) of {annotations.path} have no (non-crowd) box and "
                    f"are left out of training: {', '.join(empty[:10])}"
                    + (" ..." if len(empty) > 10 else ""),
                    stacklevel=2,
                )
                entries = [e for e in entries if bool((~e.crowd).any())]
            if not entries:
                raise CocoFormatError(
                    f"{annotations.path}: an empty dataset (no image has a non-crowd box)"
                )
        self.entries = entries
        self.names = [e.file_name for e in entries]
        self._runs: dict[int, MaskRuns] = {}  # per image, decoded once (preload: before forks)

    @property
    def class_names(self) -> list[str]:
        return self.annotations.class_names

    def image_path(self, index: int) -> Path:
        return self.root / self.entries[index].file_name

    def image(self, index: int) -> Tensor:
        """The image as it was annotated: as displayed (EXIF orientation applied, as labelling
        tools show a phone's photo), unless only the stored pixels have the entry's size (a tool
        that ignored the orientation)."""
        entry, path = self.entries[index], str(self.image_path(index))
        try:
            shown = load_image(path, exif_transpose=True)
            if shown.shape[-2:] != (entry.height, entry.width):
                stored = load_image(path)
                if stored.shape[-2:] == (entry.height, entry.width):
                    return stored
        except DatasetReadError as e:  # named with the entry, as every check of the file
            raise CocoFormatError(f"{self.annotations.path}: image id {entry.id}: {e}") from e
        return shown

    def _keep(self, entry: CocoImage) -> Tensor:
        return ~entry.crowd if self.train else torch.ones_like(entry.crowd)

    def raw(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """The untransformed sample: uint8 image and boxes in its pixels."""
        entry = self.entries[index]
        img = self.image(index)
        h, w = img.shape[-2:]
        if (h, w) != (entry.height, entry.width):  # boxes of another size: at the wrong scale
            raise CocoFormatError(
                f"{self.annotations.path}: image id {entry.id} says {entry.height}x{entry.width} "
                f"(HxW) but {self.image_path(index)} is {h}x{w}"
            )
        keep = self._keep(entry)
        boxes = entry.boxes[keep]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(h, w)),
            "labels": entry.labels[keep].clone(),
        }
        if not self.train:
            target["crowd"] = entry.crowd[keep].clone()
        if self.with_masks:  # a copy: the cached runs are shared by every draw
            if index not in self._runs:
                self._runs[index] = mask_runs(instance_masks(entry, keep, self.annotations.path))
            target["mask_runs"] = self._runs[index].copy()
        return tv_tensors.Image(img), target
