"""The one way every command-line tool starts and fails.

A user mistake (a config value, a missing file, unreadable data) ends a tool with ONE message that
names the key or the file, on stderr, and exit status 2 - never a traceback. Inside a Hydra sweep
(``-m``) the failing job is recorded as FAILED (with its message, in ``job_status.json``) and the
sweep goes on with the next job; the process then exits non-zero at the end. A run that fails
although its config was fine (``RunFailed``, e.g. non-finite weights) is one message too, exit
status 1; a run stopped by SIGTERM / SIGINT (``RunInterrupted``) exits 143 / 130 and stops a sweep.

- ``hydra_main(config_name, task)``: the ``main()`` of a Hydra tool (train, evaluate, predict,
  export)
- ``run_tool(fn)``: the same error handling for the argparse tools (anchors, summarize, benchmark)
"""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

import ssd_lightning.config.resolvers  # noqa: F401 - the ${ssd_*:} resolvers, before composing
from ssd_lightning.config.errors import (
    ConfigError,
    DataError,
    ExportCheckError,
    MissingDependencyError,
    RunFailed,
    RunInterrupted,
    UserFileError,
)
from ssd_lightning.config.extras import check_plugins
from ssd_lightning.config.job_status import launching_process, record_failure
from ssd_lightning.config.overrides import first_unparsable, quote_paths
from ssd_lightning.config.paths import config_dir

log = logging.getLogger("ssd_lightning")

# (error types, the word the message starts with)
USER_ERRORS: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((ConfigError, MissingMandatoryValue, HydraException), "Config error"),
    ((DataError,), "Data error"),
    ((UserFileError, FileNotFoundError, MissingDependencyError, ExportCheckError), "Error"),
)
ALL_USER_ERRORS = tuple(t for types, _ in USER_ERRORS for t in types)


class JobFailed(CompactHydraException):
    """A sweep job's user error: Hydra marks the job FAILED, runs the rest, and prints this
    message (no traceback) at the end."""


def kind_of(error: BaseException) -> str:
    return next(kind for types, kind in USER_ERRORS if isinstance(error, types))


def hydra_message(error: BaseException) -> str:
    """Hydra's own error as one line: its sentences (one per line), the list of options it
    indents under a line ending in ':', then the first line of the OmegaConf error behind it.
    The config search path Hydra appends is left out: it names no key."""
    text = str(error).split("Config search path:")[0]
    parts: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[:1].isspace() and parts:  # an item of the list the line before introduces
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        else:
            parts.append(line.strip())
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        if first not in text:
            parts.append(f"({first})")
    if isinstance(error, OverrideParseException):  # Hydra's message names no override
        bad = first_unparsable(sys.argv[1:])
        if bad is not None:
            parts.insert(0, f"{bad}:")
    return " ".join(
        p if i == len(parts) - 1 or p.endswith((".", ":", ";", ")")) else f"{p}."
        for i, p in enumerate(parts)
    )


def message_of(error: BaseException | str) -> str:
    """The error's message for a person, on one line where it is Hydra's (``hydra_message``).
    An error re-raised from a DataLoader worker carries the worker's whole traceback in its
    message; its last line is the original message."""
    if isinstance(error, HydraException):
        return hydra_message(error)
    text = str(error)
    missing = re.search(r"Missing mandatory value: ([\w.\[\]]+)", text)
    if missing:  # OmegaConf's, over three lines; the key is what the user needs
        key = missing[1]
        return f"{key} is not set (its config says ???): give it, e.g. {key}=<value>"
    if "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last.strip())  # "pkg.module.SomeError: message"
    return text


def exit_with_error(error: BaseException | str, kind: str = "Error") -> NoReturn:
    """One message on stderr, exit status 2."""
    print(f"\n{kind}: {message_of(error)}", file=sys.stderr)
    sys.exit(2)


class _DropAdverts(logging.Filter):
    """Lightning's tip to install its cloud logger: not something a run's log needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def route_library_logs() -> None:
    """Send Lightning's messages (when the tool uses Lightning) and Python warnings through
    Hydra's logging (console + <run dir>/<task>.log), once each."""
    logging.captureWarnings(True)  # warnings (e.g. random-init weights) land in the run's log
    if "lightning" not in sys.modules:  # predict runs without Lightning: nothing to reroute
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    quiet_lightning()


_ADVERTS = _DropAdverts()


def quiet_lightning() -> None:
    """Leave out what Lightning prints that no user can act on: its cloud-logger tip, and a
    deprecation it triggers itself with recent torch."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_ADVERTS)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def log_to_files(message: str, logger: logging.Logger = log, level: int = logging.ERROR) -> None:
    """Record a message in the run's log file(s) only, where the console shows it otherwise (an
    error from ``exit_with_error``, the progress bar)."""
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


_FULL_ERROR = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


class _HeldStderr:
    """stderr held back from the start of a Hydra tool until its task starts: a mistake Hydra
    reports itself before that (an unknown key, a malformed override, an option no group has)
    comes out over several lines, which ``hydra_main`` replaces by one. Anything else held is
    passed on as it was. Hydra's and the run's logging go to stdout, so nothing logs into the
    buffer."""

    def __init__(self) -> None:
        self.real = sys.stderr
        self.buffer = io.StringIO()
        sys.stderr = self.buffer

    def release(self, drop: Sequence[str] = (), error: BaseException | None = None) -> None:
        """stderr back, with what was held less the texts in ``drop`` and the traceback Hydra
        printed of ``error`` (an error not its own, e.g. a ValueError of its override parser)."""
        if sys.stderr is self.buffer:
            sys.stderr = self.real
            text = self.buffer.getvalue()
            for piece in drop:
                text = text.replace(piece, "", 1)
            if error is not None:
                name = re.escape(type(error).__name__)
                text = re.sub(rf"Traceback \(most recent call last\):\n.*?^{name}:[^\n]*\n?", "",
                              text, count=1, flags=re.S | re.M)  # fmt: skip
            if text.strip():
                self.real.write(text)
                self.real.flush()


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _group_set_to_null(error: Exception) -> Exception | str:
    """Hydra's refusal of ``<group>=null`` names neither the override nor the way to say it."""
    if "Config group override must be" not in str(error):
        return error
    groups = [a.split("=")[0] for a in sys.argv[1:] if re.fullmatch(r"[\w/@]+=null", a)]
    if not groups:
        return error
    return (
        f"{groups[0]}=null: a config group is left out with ~{groups[0]} (or by not naming it); "
        f"its options: {groups[0]}=<option>"
    )


def hydra_main(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """The ``main()`` of a Hydra tool: ``conf/<config_name>.yaml``, library logs routed, user
    mistakes reported as one message (exit 2; in a sweep: the job FAILED, the sweep goes on)."""

    started = False  # whether Hydra got as far as the task
    held: _HeldStderr | None = None

    def run(cfg: DictConfig) -> Any:
        nonlocal started
        started = True
        if held is not None:
            held.release()
        route_library_logs()
        try:
            try:
                return task(cfg)
            except InterpolationResolutionError as e:
                # a resolver's own user error (e.g. ${ssd_coco_classes:} reading a bad file)
                inner = e.__cause__ or e.__context__
                if isinstance(inner, ALL_USER_ERRORS):
                    raise inner from None
                raise
        except ALL_USER_ERRORS as e:
            kind = kind_of(e)
            log_to_files(f"{kind}: {message_of(e)}")
            if _in_sweep():
                raise JobFailed(f"{kind}: {message_of(e)}") from None
            record_failure(f"{kind}: {message_of(e)}")
            exit_with_error(e, kind)
        except RunFailed as e:  # the job FAILED (a sweep goes on); one message, exit status 1
            log.error("Run failed: %s", e)
            raise JobFailed(f"Run failed: {e}") from None

    def main() -> None:
        nonlocal started, held
        try:
            path = str(config_dir())
            check_plugins(sys.argv[1:])
            # a path Hydra's grammar cannot read as typed (a=b.jpg, café.jpg, ~/x) means the path
            sys.argv[1:] = quote_paths(sys.argv[1:])
        except (ConfigError, MissingDependencyError) as e:
            exit_with_error(e, kind_of(e))
        started = False
        held = _HeldStderr()
        try:
            hydra.main(version_base="1.3", config_path=path, config_name=config_name)(run)()
        except RunInterrupted as e:  # saved and recorded by the task; a sweep stops here too
            if launching_process():  # said once, not by every DDP rank
                print(f"\nInterrupted: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except SystemExit as e:
            # Hydra reports its own errors (an unknown key, a malformed override, an option no
            # group has) over several lines with exit status 1; before any task ran, that is a
            # mistake on the command line: one line and exit status 2, as every other one.
            # Hydra exits inside its handler, so the error is the SystemExit's context
            if e.code == 1 and not started:
                error = e.__context__
                if not isinstance(error, Exception):
                    held.release()
                    sys.exit(2)
                # what Hydra printed of it (anything else held, e.g. a launcher's, is passed on)
                cause = error.__cause__
                held.release([str(error), "" if cause is None else str(cause), _FULL_ERROR], error)
                kind = kind_of(error) if isinstance(error, ALL_USER_ERRORS) else "Config error"
                exit_with_error(_group_set_to_null(error), kind)
            raise
        finally:
            held.release()

    return main


def run_tool(fn: Callable[[], Any]) -> Any:
    """Run an argparse tool's body with the same error handling as the Hydra tools."""
    quiet_lightning()
    try:
        return fn()
    except ALL_USER_ERRORS as e:
        exit_with_error(e, kind_of(e))
