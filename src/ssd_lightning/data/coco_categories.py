"""A COCO file's ``categories`` -> the dataset's classes: category ids of any value become the
contiguous labels 1..K in ascending id order (0 = background), ``class_names[label]`` the
category's name; a val file's categories are matched to the training file's by name
(``data.class_match``: a separate export of the same classes may number them otherwise). A
training file's placeholder category (Roboflow exports the dataset's name as category 0, the
``supercategory`` of every real one, with no annotation) is no class: it would only cost a head
output and show as an n/a row of AP.

Checks raise a ``ValueError`` naming the entry (``categories[3]: ...``); the reader
(``data.coco.read_coco``) adds the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssd_lightning.core.plain import is_int
from ssd_lightning.data.class_match import match_classes

log = logging.getLogger(__name__)


def categories(
    entries: list, annotations: list | None = None
) -> tuple[list[int], list[str], list[str]]:
    """(ids ascending, names, placeholders left out) of a COCO file's ``categories`` list; label
    k = ids[k - 1]. annotations: the file's, for a training file: a category that none of them
    uses and that is the ``supercategory`` of other categories is a placeholder, left out as
    ``"<id> (<name>)"``; None = keep every category."""
    found: dict[int, str] = {}
    for i, c in enumerate(entries):
        cid = c.get("id") if isinstance(c, dict) else None
        name = c.get("name") if isinstance(c, dict) else None
        if not is_int(cid) or not isinstance(name, str) or not name:
            raise ValueError(f"categories[{i}]: needs an integer 'id' and a non-empty 'name'")
        if cid in found:
            raise ValueError(f"categories[{i}]: duplicate category id {cid}")
        found[cid] = name
    if not found:
        raise ValueError("no categories (the 'categories' list is empty)")
    left_out = [] if annotations is None else _placeholders(entries, annotations)
    ids = sorted(c for c in found if c not in left_out)
    names = [found[c] for c in ids]
    shared = [c for c in ids if names.count(found[c]) > 1]
    if shared:  # classes are told apart by name (per-class AP, a model meeting other data)
        renamed = {c: f"{found[c]} (id {c})" for c in shared}
        names = [renamed.get(c, found[c]) for c in ids]
        log.warning(
            "categories share a name; the classes are named %s", ", ".join(renamed.values())
        )
    return ids, names, [f"{c} ({found[c]})" for c in sorted(left_out)]


def _placeholders(entries: list[dict], annotations: list) -> set[int]:
    """Ids of the categories without annotations whose name is another category's
    ``supercategory`` (a category may be its own, as COCO's ``person`` is)."""
    used = {a.get("category_id") for a in annotations if is_int(_get(a, "category_id"))}
    return {
        c["id"]
        for c in entries
        if c["id"] not in used
        and any(d["id"] != c["id"] and d.get("supercategory") == c["name"] for d in entries)
    }


def _get(blob: Any, key: str) -> Any:
    return blob.get(key) if isinstance(blob, dict) else None


def match_categories(
    ids: Sequence[int],
    names: Sequence[str],
    ref_ids: Sequence[int],
    ref_names: Sequence[str],
    path: Path,
    ref_path: Path,
) -> dict[int, int]:
    """The training file's label of each of this file's category ids (``ref_ids`` / ``ref_names``:
    the training file's, in label order), by ``class_match.match_classes``: by name, else by id
    for a category renamed here; a category found neither way gets none (its annotations are
    refused, by name). Both kinds of match that differ from the ids are logged."""
    label_of, by_id = match_classes(ids, names, ref_ids, ref_names)
    own_name = dict(zip(ids, names, strict=True))
    for c in by_id:
        log.warning(
            "%s: category id %s is %r here but %r in %s; matched by id",
            path,
            c,
            own_name[c],
            ref_names[label_of[c] - 1],
            ref_path,
        )
    moved = [
        f"{n} {c} -> {ref_ids[label_of[c] - 1]}"
        for c, n in zip(ids, names, strict=True)
        if c in label_of and ref_ids[label_of[c] - 1] != c
    ]
    if moved:
        log.warning(
            "%s: categories matched to %s's by name (id here -> there): %s",
            path,
            ref_path,
            ", ".join(moved),
        )
    return label_of
