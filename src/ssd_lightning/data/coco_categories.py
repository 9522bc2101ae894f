"""A COCO file's ``categories`` -> the dataset's classes: category ids of any value become the
contiguous labels 1..K in ascending id order (0 = background), ``class_names[label]`` the
category's name; a val file's categories are matched to the training file's by name (a separate
export of the same classes may number them otherwise).

Checks raise a ``ValueError`` naming the entry (``categories[3]: ...``); the reader
(``data.coco.read_coco``) adds the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def categories(entries: list) -> tuple[list[int], list[str]]:
    """(ids ascending, names) of a COCO file's ``categories`` list; label k = ids[k - 1]."""
    found: dict[int, str] = {}
    for i, c in enumerate(entries):
        cid = c.get("id") if isinstance(c, dict) else None
        name = c.get("name") if isinstance(c, dict) else None
        if not _int(cid) or not isinstance(name, str) or not name:
            raise ValueError(f"categories[{i}]: needs an integer 'id' and a non-empty 'name'")
        if cid in found:
            raise ValueError(f"categories[{i}]: duplicate category id {cid}")
        found[cid] = name
    if not found:
        raise ValueError("no categories (the 'categories' list is empty)")
    ids = sorted(found)
    return ids, [found[c] for c in ids]


def match_categories(
    ids: Sequence[int],
    names: Sequence[str],
    ref_ids: Sequence[int],
    ref_names: Sequence[str],
    path: Path,
    ref_path: Path,
) -> dict[int, int]:
    """The training file's label of each of this file's category ids (``ref_ids`` / ``ref_names``:
    the training file's, in label order): by name (the names travel with the model, and a
    separate export of the same classes may number them otherwise), else by id for a category
    renamed here; a category found neither way gets none (its annotations are refused, by name).
    Both kinds of match that differ from the ids are logged."""
    by_name = {n: k for k, n in enumerate(ref_names, start=1) if ref_names.count(n) == 1}
    by_id = {c: k for k, c in enumerate(ref_ids, start=1)}
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
