"""Files written all or nothing: checkpoints, the exported model, metrics.json, job_status.json.

``atomic_write(path)`` hands out a temporary path in the same directory; once the block has
written it, the file is flushed to disk (fsync) and renamed over ``path`` (``os.replace``, atomic
within a filesystem), and the directory entry is synced too. A crash or a kill at any moment
leaves either the old file or the new one, never a truncated mix - unlike a temporary file in
``$TMPDIR``, whose final move becomes a copy when ``$TMPDIR`` is on another filesystem. What a
kill can leave is the temporary file (``.<name>.<hex>.tmp``), which ``remove_stale_temps`` clears.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what atomic_write names its temporary files


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """``with atomic_write(p) as tmp: <write tmp>`` replaces ``p`` only once ``tmp`` is complete
    and on disk; on an exception ``tmp`` is removed and ``p`` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every platform / filesystem syncs a directory
        _fsync(path.parent, os.O_RDONLY)


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> Path:
    """``data`` as indented JSON, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
    return Path(path)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporary files that killed writes left in ``directory``."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        if not _TEMP_NAME.match(tmp.name):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed
