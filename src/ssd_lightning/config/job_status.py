"""``<job dir>/job_status.json``: Hydra's own job status, for ``summarize`` and schedulers.

Hydra keeps a job's status (COMPLETED / FAILED) in memory only. ``JobStatusCallback`` (enabled in
``conf/hydra/default.yaml`` under ``hydra.callbacks``) writes it at the end of every job with the
exception when it failed and the task's return value.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback

JOB_STATUS_FILE = "job_status.json"


def read_job_status(job_dir: Path) -> dict[str, Any]:
    """The job's ``job_status.json`` as a dict ({} when missing or unreadable)."""
    try:
        return json.loads((Path(job_dir) / JOB_STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class JobStatusCallback(Callback):
    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP children share the parent's dir
            return
        try:
            out = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        except AttributeError:
            return
        status = getattr(job_return.status, "name", str(job_return.status))
        value = getattr(job_return, "_return_value", None)
        error = None
        if isinstance(value, CompactHydraException):  # a user error: its message is complete
            error = str(value)
        elif isinstance(value, BaseException):
            error = f"{type(value).__name__}: {value}"
        info = {
            "status": status,
            "error": error,
            "return_value": value if isinstance(value, int | float | str) else None,
            "overrides": list(job_return.overrides or []),
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_STATUS_FILE).write_text(json.dumps(info, indent=2) + "\n")
