"""Where a training run starts, and which run dir it may write.

- ``resume=<run dir>`` continues that run in its own dir with its own config: ``resume_argv``
  turns the command line into the run's original overrides (``.hydra/overrides.yaml``) followed
  by the new ones (the later wins, e.g. ``trainer.max_epochs=200`` to train on) and Hydra's run
  dir set to that dir; the run restarts from ``<run dir>/checkpoints/last.ckpt``.
  ``ckpt_path=<file>`` resumes from any checkpoint into the current run dir (the same overrides
  must then be given by hand).
- ``start_checkpoint`` checks, before anything is built, that the checkpoint reads weights-only
  (``read_checkpoint``), holds a training state of this project and a network built like the
  config's (``architecture_differences``); each problem is one message.
- A run dir that already holds a run (its checkpoints, exported model or metrics.json) is not
  overwritten unless the run resumes in it or ``overwrite=true`` says to start over there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.config.atomic import remove_stale_temps
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.job_status import JOB_STATUS_FILE
from ssd_lightning.data.datamodule import DetectionDataModule
from ssd_lightning.training.checkpoint import (
    CKPT_KEY,
    CheckpointError,
    architecture_differences,
    is_exported,
    net_config,
    read_checkpoint,
)
from ssd_lightning.training.classes import use_model_classes
from ssd_lightning.training.run_outputs import EVAL_METRICS_FILE, METRICS_FILE

log = logging.getLogger(__name__)

# in a run dir, as the default config lays it out
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # what resume= restarts from
BEST_MODEL_FILE = "ssd_resnet34_best.pt"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


def _first_process() -> bool:
    """Rank 0 of a (possibly distributed) run, judged before any Trainer exists."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def resume_argv(argv: list[str]) -> list[str]:
    """``[prog, ..., resume=<dir>, ...]`` -> ``[prog, <the run's overrides>, ..., resume=<dir>,
    ..., hydra.run.dir="<dir>"]``; any other argv unchanged. Raises ConfigError naming the dir
    when it holds no run to resume."""
    given = [a for a in argv[1:] if a.startswith("resume=")]
    if not given:
        return argv
    value = given[-1].partition("=")[2].strip("'\"")
    if value in ("", "null", "None"):
        return argv
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise ConfigError("resume=<run dir> continues one run; it cannot be part of a -m sweep")
    run_dir = Path(value).expanduser().resolve()
    if run_dir.is_file():  # <run dir>/checkpoints/last.ckpt
        run_dir = run_dir.parent
    if run_dir.name == "checkpoints" and not (run_dir / OVERRIDES_FILE).is_file():
        run_dir = run_dir.parent
    overrides_file = run_dir / OVERRIDES_FILE
    if not overrides_file.is_file():
        raise ConfigError(
            f"resume={value}: {run_dir} is not a training run dir (no {OVERRIDES_FILE}); give the "
            "run's dir, e.g. resume=outputs/<date>/<time>"
        )
    try:
        original = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"resume={value}: cannot read {overrides_file} ({e})") from None
    # the checkpoint a run started from (ckpt_path=) is not where it continues from: its own is
    original = [o for o in original if not o.lstrip("+~").startswith("ckpt_path=")]
    rest = [a if not a.startswith("resume=") else f"resume={run_dir}" for a in argv[1:]]
    return [argv[0], *original, *rest, f'hydra.run.dir="{run_dir}"']


# the run dir's Hydra files as they were before this command (see remember_run_config)
_RUN_CONFIG_BEFORE: dict[Path, bytes] = {}


def remember_run_config(argv: list[str]) -> None:
    """Before Hydra starts: keep the ``.hydra/`` files of the run dir the command writes into.
    Hydra rewrites them before the task runs; a resume refused before it starts puts them back
    (``restore_run_config``), or the next ``resume=`` would replay the refused overrides."""
    value = _arg(argv, "hydra.run.dir")
    if value:
        hydra_dir = Path(value).expanduser() / OVERRIDES_FILE.parent
        _RUN_CONFIG_BEFORE.update({p: p.read_bytes() for p in hydra_dir.glob("*.yaml")})


def restore_run_config(refused: bool) -> None:
    """``refused``: put back the files ``remember_run_config`` kept; otherwise the run has
    started and its new config is the run's. Either way the kept copies are dropped."""
    if refused and _first_process():
        for path, data in _RUN_CONFIG_BEFORE.items():
            path.write_bytes(data)
    _RUN_CONFIG_BEFORE.clear()


def previous_run(
    run_dir: Path, checkpoint_dir: Path | None = None, best_model: Path | None = None
) -> list[Path]:
    """The outputs of a run that already lives in ``run_dir``: its checkpoints, exported model and
    metrics.json (by default where the default config puts them)."""
    checkpoint_dir = checkpoint_dir or run_dir / "checkpoints"
    found = sorted(checkpoint_dir.glob("*.ckpt"))
    for path in (run_dir / METRICS_FILE, best_model or run_dir / BEST_MODEL_FILE):
        if path.is_file():
            found.append(path)
    return found


def _cfg_previous_run(cfg: DictConfig, output_dir: Path) -> list[Path]:
    best = OmegaConf.select(cfg, "callbacks.model_checkpoint.path", default=None)
    return previous_run(output_dir, _checkpoint_dir(cfg, output_dir), best and Path(best))


def _checkpoint_dir(cfg: DictConfig, output_dir: Path) -> Path:
    where = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath", default=None)
    return Path(where) if where else output_dir / "checkpoints"


def _arg(argv: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` (or ``+key=`` / ``++key=``) in argv, quotes stripped
    and ``${oc.env:VAR}`` / ``${oc.env:VAR,default}`` resolved (as a SLURM job names its run
    dir); None when absent, or when another interpolation is left (Hydra's to resolve)."""
    values = [a.partition("=")[2] for a in argv if a.lstrip("+").startswith(f"{key}=")]
    if not values:
        return None
    value = re.sub(r"\$\{oc\.env:([^,}]+)(?:,([^}]*))?\}", _env_value, values[-1].strip("'\""))
    return None if "${" in value else value


def _env_value(match: re.Match) -> str:
    found = os.environ.get(match[1].strip(), match[2])
    return "${unset}" if found is None else found.strip().strip("'\"")  # unset: left to Hydra


def refuse_existing_run_dir(argv: list[str]) -> None:
    """Before Hydra writes ``.hydra/`` into it: a ``hydra.run.dir`` (or a ``hydra.sweep.dir``'s
    job dirs) holding a run is not reused unless the command resumes or says overwrite=true."""
    if _arg(argv, "resume") not in (None, "null"):
        return
    if str(_arg(argv, "overwrite")).lower() == "true":
        return
    ckpt = _arg(argv, "ckpt_path")
    ckpt = None if ckpt in (None, "null") else Path(ckpt).expanduser().resolve()
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        value = _arg(argv, key)
        if not value:  # absent, or an interpolation only Hydra resolves: checked later
            continue
        root = Path(value).expanduser()
        dirs = [root] if key == "hydra.run.dir" else sorted(p for p in root.glob("*") if p.is_dir())
        for run_dir in dirs:
            found = previous_run(run_dir)
            in_place = ckpt is not None and ckpt.is_relative_to(run_dir.resolve())
            if found and not in_place:  # ckpt_path=<its own last.ckpt> continues it there
                _refuse(key if key == "hydra.run.dir" else f"{key} job", run_dir, found)


def _refuse(key: str, run_dir: Path, found: list[Path]) -> None:
    shown = ", ".join(str(p.relative_to(run_dir)) for p in found[:4])
    raise ConfigError(
        f"{key}={run_dir} already holds a run ({shown}); continue it with resume={run_dir}, "
        "start over in it with overwrite=true, or choose another run dir"
    )


def _check_checkpoint(cfg: DictConfig, path: Path, key: str) -> None:
    blob = read_checkpoint(path, key=key, mmap=True)  # no need to read the tensors twice
    if is_exported(blob):
        raise CheckpointError(
            f"{key}={path}: an exported model holds no training state to resume; resume from "
            "the run's checkpoints/last.ckpt (resume=<run dir>)"
        )
    if CKPT_KEY not in blob or "state_dict" not in blob:
        raise CheckpointError(f"{key}={path}: not a checkpoint written by ssd_lightning training")
    wanted = OmegaConf.to_container(cfg.model.net, resolve=True)
    saved = net_config(blob, path)
    differences = architecture_differences(saved, wanted)
    if differences:
        # a default that changed since the run (the anchors did) is not in its overrides
        name = (saved.get("anchors") or {}).get("name")
        again = (
            f"; if a default changed since the run, give its value again: anchors={name}"
            if name and name != (wanted.get("anchors") or {}).get("name")
            else ""
        )
        raise CheckpointError(
            f"{key}={path}: the checkpoint's network is not the one this config builds:\n  - "
            + "\n  - ".join(differences)
            + f"\nResume with the run's own settings (resume=<run dir> reuses them{again}) or "
            "start a new run."
        )


def start_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from (None: a fresh start), after the checks of
    this module; clears what a fresh start (``overwrite=true``) or a killed save left behind."""
    output_dir = output_dir.resolve()
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    key = "ckpt_path"
    if resume is not None:
        run_dir = Path(str(resume)).expanduser().resolve()
        if run_dir != output_dir:
            raise ConfigError(
                f"resume={resume}: the run dir of this job is {output_dir}; resume= continues a "
                "run in its own dir (python -m ssd_lightning.train resume=<run dir> sets it)"
            )
        last = run_dir / LAST_CHECKPOINT
        if ckpt_path is not None and Path(str(ckpt_path)).expanduser().resolve() != last:
            raise ConfigError(f"resume={resume} and ckpt_path={ckpt_path}: give one of them")
        if not last.is_file():
            raise ConfigError(
                f"resume={resume}: no {LAST_CHECKPOINT} in it (the run stopped before its first "
                "checkpoint); start it again with overwrite=true"
            )
        ckpt_path, key = last, "resume"
    ckpt = None if ckpt_path is None else Path(str(ckpt_path)).expanduser().resolve()
    in_place = ckpt is not None and ckpt.is_relative_to(output_dir)
    previous = _cfg_previous_run(cfg, output_dir)
    if previous and not in_place and not cfg.get("overwrite", False):
        _refuse("hydra.run.dir", output_dir, previous)
    if ckpt is not None:
        _check_checkpoint(cfg, ckpt, key)
    if _first_process():
        if previous and not in_place:  # overwrite=true: no stale best model, metrics or status
            log.warning("overwrite=true: removing the previous run's %s", previous)
            for directory in (_checkpoint_dir(cfg, output_dir), *_logger_dirs(cfg, output_dir)):
                shutil.rmtree(directory, ignore_errors=True)  # no old curves in the dashboards
            for path in (*previous, output_dir / JOB_STATUS_FILE, output_dir / EVAL_METRICS_FILE):
                path.unlink(missing_ok=True)
        for directory in (output_dir, _checkpoint_dir(cfg, output_dir)):
            if directory.is_dir():
                remove_stale_temps(directory)
    return None if ckpt is None else str(ckpt)


def _logger_dirs(cfg: DictConfig, output_dir: Path) -> list[Path]:
    """The loggers' folders inside the run dir (``<save_dir>/<name>``: tensorboard/, csv/)."""
    out = []
    for node in (cfg.get("logger") or {}).values():
        save_dir, name = OmegaConf.select(node, "save_dir"), OmegaConf.select(node, "name")
        if save_dir is None or not name:
            continue
        path = (Path(str(save_dir)) / str(name)).expanduser().resolve()
        if path.is_relative_to(output_dir) and path != output_dir:
            out.append(path)
    return out


def use_checkpoint_classes(
    cfg: DictConfig, ckpt_path: str, datamodule: DetectionDataModule
) -> None:
    """A resumed run goes on training the checkpoint's classes: the data's labels are matched to
    them by name (``training.classes``), so a training file exported again, its categories
    numbered otherwise, is renumbered as the run's rather than trained under swapped names.
    Before the fit (``setup``)."""
    names = read_checkpoint(ckpt_path, mmap=True)[CKPT_KEY].get("class_names")
    if names:
        key = "resume" if cfg.get("resume") is not None else "ckpt_path"
        use_model_classes(datamodule, names, f"{key}={cfg.get(key)}")
