"""Two lists of the same classes matched by name. The names are what travels (with a model, with
its training file); the numbers are what each export happens to give them (COCO category ids, a
dataset's labels), so another export of the same classes may number them otherwise. One rule for
a val file against its training file (``data.coco``) and for a dataset against a trained model
(``training.classes``):

1. by name, where the name means one class on each side;
2. else by number (the same category id / label), for a class renamed on one side, where no
   class of step 1 took that number's class already;
3. else no match: the caller refuses it (naming both lists) or its annotations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def match_classes(
    keys: Sequence[Hashable],
    names: Sequence[str],
    ref_keys: Sequence[Hashable],
    ref_names: Sequence[str],
) -> tuple[dict[Hashable, int], list[Hashable]]:
    """(label_of, by_key): the reference's label (1-based position in ``ref_keys``) of each of
    ``keys`` (``names[i]`` is the name of ``keys[i]``) that matches, and the keys matched by
    number only (renamed classes, for a warning). Keys that match neither way are not in
    ``label_of``."""
    own, ref = Counter(names), Counter(ref_names)
    label_by_name = {n: k for k, n in enumerate(ref_names, start=1) if ref[n] == 1}
    label_by_key = {c: k for k, c in enumerate(ref_keys, start=1)}
    label_of = {
        c: label_by_name[n]
        for c, n in zip(keys, names, strict=True)
        if own[n] == 1 and n in label_by_name
    }
    taken = set(label_of.values())
    by_key = [
        c for c in keys if c not in label_of and c in label_by_key and label_by_key[c] not in taken
    ]
    label_of |= {c: label_by_key[c] for c in by_key}
    return label_of, by_key
