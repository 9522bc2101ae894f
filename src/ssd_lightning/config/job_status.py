"""``<job dir>/job_status.json``: Hydra's own job status, for ``summarize`` and schedulers.

Hydra keeps a job's status (COMPLETED / FAILED) in memory only. ``JobStatusCallback`` (enabled in
``conf/hydra/default.yaml`` under ``hydra.callbacks``) writes it at the end of every job with the
exception when it failed and the task's return value. A training run stopped by SIGTERM / SIGINT
writes INTERRUPTED itself (``write_job_status``), and a user error outside a sweep FAILED
(``record_failure``): both leave the process without returning to Hydra.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback

from ssd_lightning.config.atomic import write_json

JOB_STATUS_FILE = "job_status.json"


def read_job_status(job_dir: Path) -> dict[str, Any]:
    """The job's ``job_status.json`` as a dict ({} when missing or unreadable)."""
    try:
        status = json.loads((Path(job_dir) / JOB_STATUS_FILE).read_text())
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8 (a killed write, a typo)
        return {}
    return status if isinstance(status, dict) else {}


def write_job_status(
    job_dir: str | Path,
    status: str,
    error: str | None = None,
    return_value: Any = None,
    overrides: list[str] | None = None,
) -> Path:
    """Write ``<job_dir>/job_status.json`` (atomically): COMPLETED / FAILED from Hydra, or
    INTERRUPTED from a training run stopped by a signal (which never reaches Hydra's callback)."""
    info = {
        "status": status,
        "error": error,
        "return_value": return_value if isinstance(return_value, int | float | str) else None,
        "overrides": list(overrides or []),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    return write_json(Path(job_dir) / JOB_STATUS_FILE, info)


def launching_process() -> bool:
    """Not a DDP child that Lightning started on this node (LOCAL_RANK > 0): the children share
    the launching process's run dir and console, so what is written or said once is left to it."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def record_failure(error: str) -> None:
    """FAILED in the current Hydra job's ``job_status.json``, for a task that leaves the process
    without returning to Hydra (a user error outside a sweep exits with status 2), so that an
    earlier status (e.g. INTERRUPTED of the run a refused resume= came from) is not left there."""
    if not HydraConfig.initialized() or not launching_process():
        return
    hc = HydraConfig.get()
    if "job_status" in (hc.callbacks or {}):
        write_job_status(hc.runtime.output_dir, "FAILED", error, overrides=list(hc.overrides.task))


class JobStatusCallback(Callback):
    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if not launching_process():
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
        write_job_status(out, status, error, value, list(job_return.overrides or []))
