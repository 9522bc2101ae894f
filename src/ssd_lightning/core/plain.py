"""Config values as plain Python, for code that must not depend on omegaconf, and what counts as
an integer or a number in them: YAML and JSON read ``true`` as a bool, and a Python bool is an
int, so every check of a user's value asks here rather than repeating the exception."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def to_plain(obj: Any) -> Any:
    """Mappings (DictConfig included) -> dicts, sequences (ListConfig, tuples) -> lists,
    recursively; strings and scalars as they are."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return [to_plain(v) for v in obj]
    return obj


def is_int(value: Any, low: int | None = None) -> bool:
    """An int (not a bool), and ``>= low`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def is_number(value: Any, finite: bool = True) -> bool:
    """An int or a float (not a bool); finite unless ``finite=False`` (an int beyond a float's
    range, which JSON allows, is not: it would overflow where it is used)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return not finite or abs(value) <= sys.float_info.max
    return not finite or math.isfinite(value)
