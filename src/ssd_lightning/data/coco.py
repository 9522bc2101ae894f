"""COCO-format detection data: the annotation file's reader (``read_coco``: every check names
the file and the entry), the instance masks of an image's annotations (``instance_masks``; the
decoding is ``data.segmentation``'s), and ``CocoDataset`` (a ``DetectionDataset`` over one
annotation file's images).

Boxes: COCO ``bbox`` is ``[x, y, width, height]`` in pixels of the image as annotated (a photo's
EXIF orientation applied, as labelling tools display it, unless only the stored pixels have the
entry's width and height); here they become xyxy pixel edges (the package's format), clipped to
the image. Category ids of any value map to the contiguous labels 1..K in ascending id order
(0 = background); ``class_names[label]`` is the category's name. ``iscrowd`` annotations are
left out of training and kept, flagged, for the evaluation (COCO's rule: a detection on a crowd
region is neither a hit nor a false positive).
Segmentations (polygons or RLE) become the instance masks of the mask-tight boxes, as Penn-Fudan's
mask files do (``mask_runs.MaskRuns``); an annotation without one gets its box, filled.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from ssd_lightning.data.dataset import DatasetReadError, DetectionDataset, Transform, load_image
from ssd_lightning.data.mask_runs import MaskRuns, mask_runs
from ssd_lightning.data.segmentation import checked_segmentation, segmentation_mask

log = logging.getLogger(__name__)

BACKGROUND = "background"


class CocoFormatError(DatasetReadError):
    """A COCO annotation file that cannot be used as it is; the message names file and entry."""


@dataclass
class CocoImage:
    """One ``images`` entry with its annotations (boxes already checked and clipped)."""

    id: int
    file_name: str
    height: int
    width: int
    boxes: Tensor  # (G, 4) float32 xyxy, pixel edges of the stored image
    labels: Tensor  # (G,) int64, 1..K
    crowd: Tensor  # (G,) bool, iscrowd
    ann_ids: list[Any]  # the annotations' ids (for messages)
    segmentations: list[Any]  # per box: polygons [[x, y, ...], ...], an RLE dict, or None


@dataclass
class CocoAnnotations:
    """A COCO annotation file, read and checked (``read_coco``)."""

    path: Path
    images_dir: Path
    images: list[CocoImage]
    category_ids: list[int]  # label k is category_ids[k - 1]
    class_names: list[str]  # index = label, class_names[0] = "background"
    clipped: int = 0
    dropped: int = 0
    has_segmentations: bool = field(default=False)


def _fail(path: Path, what: str) -> CocoFormatError:
    return CocoFormatError(f"{path}: {what}")


def load_coco_json(path: str | Path, key: str = "data.train_json") -> dict:
    """The JSON of a COCO detection file: a dict with ``images``, ``annotations`` and
    ``categories`` lists; anything else raises ``CocoFormatError`` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CocoFormatError(f"{key}={path}: no such file (a COCO annotation JSON)")
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from e
    lists = ("images", "annotations", "categories")
    missing = [k for k in lists if not isinstance(_get(blob, k), list)]
    if missing:
        raise _fail(
            path,
            "not a COCO detection file: it needs the lists 'images', 'annotations' and "
            f"'categories' (missing or not a list: {', '.join(missing)})",
        )
    return blob


def _get(blob: Any, key: str) -> Any:
    return blob.get(key) if isinstance(blob, dict) else None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def categories(blob: dict, path: Path) -> tuple[list[int], list[str]]:
    """(ids ascending, names) of a COCO file's ``categories``; label k = ids[k - 1]."""
    found: dict[int, str] = {}
    for i, c in enumerate(blob["categories"]):
        cid, name = _get(c, "id"), _get(c, "name")
        if not _int(cid) or not isinstance(name, str) or not name:
            raise _fail(path, f"categories[{i}]: needs an integer 'id' and a non-empty 'name'")
        if cid in found:
            raise _fail(path, f"categories[{i}]: duplicate category id {cid}")
        found[cid] = name
    if not found:
        raise _fail(path, "no categories (the 'categories' list is empty)")
    ids = sorted(found)
    return ids, [found[c] for c in ids]


def read_coco(
    path: str | Path,
    images_dir: str | Path,
    reference: CocoAnnotations | None = None,
    key: str = "data.train_json",
) -> CocoAnnotations:
    """Read and check a COCO detection file whose ``file_name`` entries lie under ``images_dir``.

    reference: the training file, whose classes (labels and names) this one must follow
    (``match_categories``); None = this file's own categories. Boxes partly outside their image
    are clipped, boxes with no area left (or a non-positive width / height) dropped; both are
    counted in one log line.
    """
    path, images_dir = Path(path).expanduser(), Path(images_dir).expanduser()
    blob = load_coco_json(path, key)
    own_ids, own_names = categories(blob, path)
    if reference is None:
        ids, names = own_ids, own_names
        label_of = {c: k for k, c in enumerate(ids, start=1)}
    else:
        ids, names = reference.category_ids, reference.class_names[1:]
        label_of = match_categories(own_ids, own_names, reference, path)
    own_name = dict(zip(own_ids, own_names, strict=True))
    if not images_dir.is_dir():
        raise CocoFormatError(f"data.images_dir={images_dir}: no such folder")

    entries: dict[int, dict] = {}
    position: dict[int, int] = {}
    files: dict[str, int] = {}
    for i, im in enumerate(blob["images"]):
        iid, name = _get(im, "id"), _get(im, "file_name")
        if not _int(iid) or not isinstance(name, str) or not name:
            raise _fail(path, f"images[{i}]: needs an integer 'id' and a 'file_name'")
        if iid in entries:
            raise _fail(
                path, f"images[{i}]: duplicate image id {iid} (also images[{position[iid]}])"
            )
        if name in files:  # the split and the messages name images by file
            raise _fail(
                path, f"images[{i}] (id {iid}): file_name {name} also in images[{files[name]}]"
            )
        files[name] = i
        file = images_dir / name
        if not file.is_file():
            raise _fail(path, f"images[{i}] (id {iid}): image file {file} not found")
        h, w = _get(im, "height"), _get(im, "width")
        if not (_int(h) and _int(w) and h > 0 and w > 0):
            w, h = _header_size(file, path, f"images[{i}] (id {iid})")
        entries[iid], position[iid] = {"file_name": name, "height": h, "width": w}, i
    if not entries:
        raise _fail(path, "an empty dataset: the 'images' list is empty")

    per_image: dict[int, list[tuple]] = {iid: [] for iid in entries}
    clipped = dropped = degenerate = 0
    has_seg = False
    for i, a in enumerate(blob["annotations"]):
        iid, cid, bbox = _get(a, "image_id"), _get(a, "category_id"), _get(a, "bbox")
        where = f"annotations[{i}] (id {_get(a, 'id')})"
        if iid not in entries:
            raise _fail(path, f"{where}: image_id {iid!r} is not the id of any image")
        if cid not in label_of:
            if cid in own_name:  # a category of this file that the training file lacks
                raise _fail(
                    path,
                    f"{where}: category_id {cid} ({own_name[cid]}) is not a class of "
                    f"{reference.path if reference else path} (its classes: {', '.join(names)})",
                )
            shown = ", ".join(map(str, own_ids[:20])) + (" ..." if len(own_ids) > 20 else "")
            raise _fail(path, f"{where}: unknown category_id {cid!r} (the categories are {shown})")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise _fail(
                path, f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}"
            )
        x, y, bw, bh = (float(v) for v in bbox)
        h, w = entries[iid]["height"], entries[iid]["width"]
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))]
        if bw <= 0 or bh <= 0 or box[2] <= box[0] or box[3] <= box[1]:
            dropped += 1
            continue
        clipped += box != [x, y, x + bw, y + bh]
        try:
            seg, left_out = checked_segmentation(_get(a, "segmentation") or None)
        except ValueError as e:
            raise _fail(path, f"{where}: {e}") from None
        degenerate += left_out
        has_seg |= seg is not None
        crowd = _get(a, "iscrowd") in (1, True, "1")  # "0" is no crowd, as 0 is
        per_image[iid].append((box, label_of[cid], crowd, _get(a, "id"), seg))
    if clipped or dropped:
        log.warning(
            "%s: %d box(es) clipped to their image, %d dropped (non-positive size or outside "
            "the image)",
            path,
            clipped,
            dropped,
        )
    if degenerate:
        log.warning(
            "%s: %d polygon(s) of fewer than 3 points ignored (their annotations keep the rest of "
            "their segmentation, or their box)",
            path,
            degenerate,
        )

    images = []
    for iid, e in entries.items():
        anns = per_image[iid]
        images.append(
            CocoImage(
                id=iid,
                file_name=e["file_name"],
                height=e["height"],
                width=e["width"],
                boxes=torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4),
                labels=torch.tensor([a[1] for a in anns], dtype=torch.int64),
                crowd=torch.tensor([a[2] for a in anns], dtype=torch.bool),
                ann_ids=[a[3] for a in anns],
                segmentations=[a[4] for a in anns],
            )
        )
    return CocoAnnotations(
        path, images_dir, images, ids, [BACKGROUND, *names], clipped, dropped, has_seg
    )


def _header_size(file: Path, path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image file from its header (no pixel decode), for an entry without
    them; an unreadable file is named with the entry."""
    try:
        with Image.open(file) as pil:
            return pil.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _fail(path, f"{where}: cannot read image file {file} ({e})") from e


def match_categories(
    ids: Sequence[int], names: Sequence[str], reference: CocoAnnotations, path: Path
) -> dict[int, int]:
    """The training file's label of each of this file's category ids: by name (the names travel
    with the model, and a separate export of the same classes may number them otherwise), else
    by id for a category renamed here; a category found neither way gets none (its annotations
    are refused, by name). Both kinds of match that differ from the ids are logged."""
    ref_names = reference.class_names[1:]
    by_name = {n: k for k, n in enumerate(ref_names, start=1) if ref_names.count(n) == 1}
    by_id = {c: k for k, c in enumerate(reference.category_ids, start=1)}
    label_of = {c: by_name[n] for c, n in zip(ids, names, strict=True) if n in by_name}
    taken = set(label_of.values())
    for c, n in zip(ids, names, strict=True):
        if c not in label_of and c in by_id and by_id[c] not in taken:
            label_of[c] = by_id[c]
            log.warning(
                "%s: category id %s is %r here but %r in %s; matched by id",
                path,
                c,
                n,
                ref_names[by_id[c] - 1],
                reference.path,
            )
    moved = [
        f"{n} {c} -> {reference.category_ids[label_of[c] - 1]}"
        for c, n in zip(ids, names, strict=True)
        if c in label_of and reference.category_ids[label_of[c] - 1] != c
    ]
    if moved:
        log.warning(
            "%s: categories matched to %s's by name (id here -> there): %s",
            path,
            reference.path,
            ", ".join(moved),
        )
    return label_of


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
        shown = load_image(path, exif_transpose=True)
        if shown.shape[-2:] != (entry.height, entry.width):
            stored = load_image(path)
            if stored.shape[-2:] == (entry.height, entry.width):
                return stored
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


@functools.cache
def _cached_classes(path: str, mtime_ns: int, size: int) -> int:
    return len(categories(load_coco_json(path), Path(path))[0]) + 1


def coco_num_classes(path: str | Path) -> int:
    """K + 1 (background) for a COCO file's K categories: the model's ``num_classes``."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as e:
        raise CocoFormatError(
            f"data.train_json={path}: no such file (a COCO annotation JSON)"
        ) from e
    return _cached_classes(str(path), st.st_mtime_ns, st.st_size)
