"""COCO annotation files: ``read_coco`` reads and checks one (every check names the file and the
entry) into ``CocoAnnotations``, the images with their boxes, labels and segmentations; the
classes are ``data.coco_categories``'s, the dataset over the images ``data.coco_dataset``'s.

Boxes: COCO ``bbox`` is ``[x, y, width, height]`` in pixels of the image as annotated (a photo's
EXIF orientation applied, as labelling tools display it, unless only the stored pixels have the
entry's width and height); here they become xyxy pixel edges (the package's format), clipped to
the image. Category ids of any value map to the contiguous labels 1..K in ascending id order
(0 = background); ``class_names[label]`` is the category's name. Segmentations (polygons or RLE)
are checked here and decoded on use (``data.segmentation``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ssd_lightning.core.plain import is_int, is_number
from ssd_lightning.data.coco_categories import categories, match_categories
from ssd_lightning.data.dataset import DatasetReadError
from ssd_lightning.data.segmentation import checked_segmentation

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
    # label k is category_ids[k - 1]; None: a model's class without a category here (relabel)
    category_ids: list[int | None]
    class_names: list[str]  # index = label, class_names[0] = "background"
    clipped: int = 0
    dropped: int = 0
    has_segmentations: bool = field(default=False)


def _fail(path: Path, what: str) -> CocoFormatError:
    return CocoFormatError(f"{path}: {what}")


def load_coco_json(path: str | Path, key: str = "data.train_json") -> dict:
    """The JSON of a COCO detection file: a dict with ``images``, ``annotations`` and
    ``categories`` lists of objects; anything else raises ``CocoFormatError`` naming the file
    (and the entry)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CocoFormatError(f"{key}={path}: no such file (a COCO annotation JSON)")
    try:
        blob = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no error
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
    for k in lists:  # the entries' own checks can then say what is wrong with the entry
        for i, entry in enumerate(blob[k]):
            if not isinstance(entry, dict):
                raise _fail(path, f"{k}[{i}]: expected an object, got {_json_kind(entry)}")
    return blob


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "a list"


def _get(blob: Any, key: str) -> Any:
    return blob.get(key) if isinstance(blob, dict) else None


def file_categories(
    blob: dict, path: Path, training: bool = True
) -> tuple[list[int], list[str], list[str]]:
    """(ids ascending, names, placeholders left out) of a COCO file's ``categories``
    (``coco_categories.categories``; ``training``: placeholders left out); a bad entry raises
    ``CocoFormatError`` naming the file and the entry."""
    try:
        return categories(blob["categories"], blob["annotations"] if training else None)
    except ValueError as e:
        raise _fail(path, str(e)) from None


def read_coco(
    path: str | Path,
    images_dir: str | Path,
    reference: CocoAnnotations | None = None,
    key: str = "data.train_json",
    dir_key: str = "data.images_dir",
) -> CocoAnnotations:
    """Read and check a COCO detection file whose ``file_name`` entries lie under ``images_dir``.

    reference: the training file, whose classes (labels and names) this one must follow
    (``match_categories``); None = this file's own categories. Boxes partly outside their image
    are clipped, boxes with no area left (or a non-positive width / height) dropped; both are
    counted in one log line.
    """
    path, images_dir = Path(path).expanduser(), Path(images_dir).expanduser()
    blob = load_coco_json(path, key)
    own_ids, own_names, left_out = file_categories(blob, path, training=reference is None)
    if left_out:
        log.info(
            "%s: category %s left out: no annotation uses it and it is the supercategory of the "
            "others (a labelling tool's placeholder, as Roboflow exports the dataset's name)",
            path,
            ", ".join(left_out),
        )
    if reference is None:
        ids, names = own_ids, own_names
        label_of = {c: k for k, c in enumerate(ids, start=1)}
    else:
        ids, names = reference.category_ids, reference.class_names[1:]
        label_of = match_categories(own_ids, own_names, ids, names, path, reference.path)
    own_name = dict(zip(own_ids, own_names, strict=True))
    if not images_dir.is_dir():
        raise CocoFormatError(f"{dir_key}={images_dir}: no such folder")

    entries: dict[int, dict] = {}
    position: dict[int, int] = {}
    files: dict[str, int] = {}
    for i, im in enumerate(blob["images"]):
        iid, name = _get(im, "id"), _get(im, "file_name")
        if not is_int(iid) or not isinstance(name, str) or not name:
            raise _fail(path, f"images[{i}]: needs an integer 'id' and a 'file_name'")
        name = _name_on_disk(images_dir, name)
        if iid in entries:
            raise _fail(
                path, f"images[{i}]: duplicate image id {iid} (also images[{position[iid]}])"
            )
        if name in files:  # the split and the messages name images by file
            raise _fail(
                path, f"images[{i}] (id {iid}): file_name {name} also in images[{files[name]}]"
            )
        files[name] = i
        file, where = images_dir / name, f"images[{i}] (id {iid})"
        try:
            found = file.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise _fail(path, f"{where}: image file {file}: {e.strerror}") from None
        if not found:
            raise _fail(path, f"{where}: image file {file} not found")
        h, w = _entry_size(im, file, path, where)
        entries[iid], position[iid] = {"file_name": name, "height": h, "width": w}, i
    if not entries:
        raise _fail(path, "an empty dataset: the 'images' list is empty")

    per_image: dict[int, list[tuple]] = {iid: [] for iid in entries}
    clipped: list[str] = []  # the entries, for the log line
    dropped: list[str] = []
    degenerate = 0
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
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise _fail(
                path, f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}"
            )
        x, y, bw, bh = (float(v) for v in bbox)
        h, w = entries[iid]["height"], entries[iid]["width"]
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))]
        if bw <= 0 or bh <= 0 or box[2] <= box[0] or box[3] <= box[1]:
            dropped.append(where)
            continue
        clipped += [where] if box != [x, y, x + bw, y + bh] else []
        try:
            seg, left_out = checked_segmentation(_get(a, "segmentation") or None)
        except ValueError as e:
            raise _fail(path, f"{where}: {e}") from None
        if isinstance(seg, dict) and list(seg["size"]) != [h, w]:
            raise _fail(
                path, f"{where}: RLE size {seg['size']} but image id {iid} is {h}x{w} (HxW)"
            )
        degenerate += left_out
        has_seg |= seg is not None
        crowd = _get(a, "iscrowd") in (1, True, "1")  # "0" is no crowd, as 0 is
        per_image[iid].append((box, label_of[cid], crowd, _get(a, "id"), seg))
    if clipped or dropped:
        log.warning(
            "%s: %d box(es) clipped to their image%s, %d dropped (non-positive size or outside "
            "the image)%s",
            path,
            len(clipped),
            _examples(clipped),
            len(dropped),
            _examples(dropped),
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
        path, images_dir, images, ids, [BACKGROUND, *names], len(clipped), len(dropped), has_seg
    )


def _examples(entries: list[str], shown: int = 3) -> str:
    """' (annotations[4] (id 9), ...)': the first entries of a log line's count."""
    more = ", ..." if len(entries) > shown else ""
    return f" ({', '.join(entries[:shown])}{more})" if entries else ""


def _name_on_disk(images_dir: Path, name: str) -> str:
    """``file_name`` as it lies under ``images_dir``: as written, else, for a Windows export
    (``images\\train\\x.jpg``), with its backslashes as path separators."""
    if "\\" in name and not (images_dir / name).is_file():
        posix = name.replace("\\", "/")  # "/" is a separator on every OS
        if (images_dir / posix).is_file():
            return posix
    return name


# EXIF orientations that turn the stored pixels by 90 degrees (as displayed: width <-> height)
_TURNED = {5, 6, 7, 8}


def _entry_size(im: dict, file: Path, path: Path, where: str) -> tuple[int, int]:
    """(height, width) of an image entry as annotated, checked against the file's header (no
    pixel decode), so boxes are clipped at the image's real edges: the entry's own size when the
    image has it as displayed (EXIF orientation applied) or as stored (a tool that ignored the
    orientation); an entry without one takes the displayed size. A size that matches neither,
    or an unreadable file, is named with the entry."""
    try:
        with Image.open(file) as pil:
            stored = pil.size[::-1]  # (H, W)
            turned = pil.getexif().get(0x0112) in _TURNED
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _fail(path, f"{where}: cannot read image file {file} ({e})") from e
    shown = stored[::-1] if turned else stored
    h, w = _get(im, "height"), _get(im, "width")
    if not (is_int(h, low=1) and is_int(w, low=1)):
        return shown
    if (h, w) not in (shown, stored):
        raise _fail(
            path,
            f"{where}: says {h}x{w} (HxW) but {file} is {shown[0]}x{shown[1]}"
            + (f" ({stored[0]}x{stored[1]} as stored)" if shown != stored else ""),
        )
    return h, w


@functools.cache
def _cached_classes(path: str, mtime_ns: int, size: int) -> int:
    return len(file_categories(load_coco_json(path), Path(path))[0]) + 1


def coco_num_classes(path: str | Path) -> int:
    """K + 1 (background) for a COCO training file's K classes (its categories but a
    placeholder, as ``read_coco`` reads them): the model's ``num_classes``."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as e:
        raise CocoFormatError(
            f"data.train_json={path}: no such file (a COCO annotation JSON)"
        ) from e
    return _cached_classes(str(path), st.st_mtime_ns, st.st_size)
