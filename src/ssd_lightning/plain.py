"""Config values as plain Python, for code that must not depend on omegaconf (the core)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def to_plain(obj: Any) -> Any:
    """DictConfig / ListConfig / tuples -> plain dicts and lists (without importing omegaconf)."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple) or type(obj).__name__ == "ListConfig":
        return [to_plain(v) for v in obj]
    return obj
