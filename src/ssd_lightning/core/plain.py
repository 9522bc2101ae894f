"""Config values as plain Python, for code that must not depend on omegaconf."""

from __future__ import annotations

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
