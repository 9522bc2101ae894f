"""Train the SSD: ``python -m ssd_lightning.train [hydra overrides]``.

Examples::

    python -m ssd_lightning.train                                   # the default recipe
    python -m ssd_lightning.train anchors=ssd augmentation=light trainer=gpu
    python -m ssd_lightning.train -m anchors=tall_skinny,ssd         # a sweep, one dir per job
    python -m ssd_lightning.train resume=outputs/<date>/<time>     # continue a stopped run

``train(cfg)`` does the work and is what tests call; ``main`` is the thin Hydra entry point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.config.cli import exit_with_error, hydra_main, message_of
from ssd_lightning.config.errors import ConfigError, RunInterrupted
from ssd_lightning.config.job_status import launching_process, write_job_status
from ssd_lightning.config.validation import flag, validate_config
from ssd_lightning.core.anchors import fitted_override_note
from ssd_lightning.evaluate import evaluate, run_eval_config
from ssd_lightning.tools.search import check_objective, objective_value
from ssd_lightning.training.builders import build
from ssd_lightning.training.lit_module import NonFiniteWeightsError
from ssd_lightning.training.resume import (
    refuse_existing_run_dir,
    remember_run_config,
    restore_run_config,
    resume_argv,
    start_checkpoint,
    use_checkpoint_classes,
)
from ssd_lightning.training.run_outputs import (
    EVAL_METRICS_FILE,
    METRICS_FILE,
    RESOLVED_CONFIG_FILE,
    collect_metrics,
    resolved_yaml,
    run_tags,
    write_metrics_json,
    write_resolved_config,
)
from ssd_lightning.training.signals import stop_on_signals

log = logging.getLogger(__name__)

# Lightning's DDP launcher re-runs this script for ranks > 0 with Hydra's argv. The parent passes
# its run dir and its job's overrides through these variables, so a child joins the parent's run
# dir (no stray dirs) and runs the same job even inside a -m sweep (see _ddp_child_argv).
DDP_RUN_DIR_ENV = "SSD_LIGHTNING_DDP_RUN_DIR"
DDP_OVERRIDES_ENV = "SSD_LIGHTNING_DDP_OVERRIDES"
_DDP_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    DDP_RUN_DIR_ENV,
    DDP_OVERRIDES_ENV,
)


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@contextlib.contextmanager
def _ddp_launch_env(trainer: Any) -> Iterator[None]:
    """For Lightning's script launcher (DDP with start_method=popen): tell the children which run
    dir and overrides to use, and afterwards undo the DDP environment so that the next job of a
    sweep launches its own children instead of waiting for ranks that are gone."""
    launcher = getattr(trainer.strategy, "launcher", None)
    is_launcher = (
        isinstance(launcher, _SubprocessScriptLauncher)
        and HydraConfig.initialized()
        and not launcher.cluster_environment.creates_processes_externally
    )
    if not is_launcher:
        yield
        return
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    hc = HydraConfig.get()
    os.environ[DDP_RUN_DIR_ENV] = str(hc.runtime.output_dir)
    os.environ[DDP_OVERRIDES_ENV] = json.dumps(_task_overrides())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _ddp_child_argv(argv: list[str]) -> list[str]:
    """In a DDP child started by Lightning (LOCAL_RANK > 0 and the parent's run dir set), replace
    Hydra's argv (which may hold -m and sweep lists) by the parent's job: its overrides and run dir.
    """
    run_dir = os.environ.get(DDP_RUN_DIR_ENV)
    rank = os.environ.get("LOCAL_RANK", "0")
    if not run_dir or rank == "0":
        return argv
    overrides = json.loads(os.environ.get(DDP_OVERRIDES_ENV, "[]"))
    return [
        argv[0],
        *overrides,
        f'hydra.run.dir="{run_dir}"',
        f"hydra.job.name=train_ddp_process_{rank}",
        "hydra.output_subdir=null",
    ]


def _test_after_fit(cfg: DictConfig, output_dir: Path, metrics: dict[str, Any]) -> None:
    """``test_after_fit``: the best model (else last.ckpt) evaluated on the validation split by
    ``evaluate``, written to ``<run dir>/eval_metrics.json``; one log line when skipped."""
    if not flag(cfg, "test_after_fit"):
        return
    if metrics.get("status") != "completed":
        log.info("test_after_fit: skipped, the run is %s", metrics.get("status"))
        return
    if cfg.data.get("split") is not None and int(cfg.data.get("val_size", 0)) == 0:
        log.info("test_after_fit: skipped, no validation split (data.val_size=0)")
        return
    best = metrics.get("best_model_path")
    last = output_dir / "checkpoints" / "last.ckpt"
    model = Path(best) if best and Path(best).is_file() else last
    if not model.is_file():
        log.info("test_after_fit: skipped, no model file (%s or %s)", best, last)
        return
    log.info("test_after_fit: evaluating %s", model)
    evaluate(run_eval_config(cfg, model, output_dir / EVAL_METRICS_FILE), show=log.info)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate the config, build data/model/trainer, fit (or resume: ``resume=<run dir>`` /
    ``ckpt_path=``), and return the final metrics (also written to ``<run dir>/metrics.json``,
    with ``status`` completed / interrupted / failed).

    Raises ``RunInterrupted`` when SIGTERM / SIGINT stopped the fit (last.ckpt, metrics.json and
    job_status.json INTERRUPTED written first) and ``RunFailed`` when it ended with non-finite
    weights."""
    started = time.monotonic()
    output_dir = Path(cfg.paths.output_dir)
    try:
        validate_config(cfg)  # config mistakes first, then the checkpoint and the run dir
        print_config = flag(cfg, "extras.print_config")
        flag(cfg, "test_after_fit")
        run_tags(cfg)
        ckpt_path = start_checkpoint(cfg, output_dir)
    except Exception:
        restore_run_config(refused=True)  # a run refused in its dir keeps its own config
        raise
    restore_run_config(refused=False)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    module, datamodule, trainer = build(cfg, validated=True)
    if ckpt_path is not None:
        use_checkpoint_classes(cfg, ckpt_path, datamodule)
    if trainer.is_global_zero and launching_process():
        write_resolved_config(cfg, output_dir)
        if print_config:
            log.info("config (%s):\n%s", output_dir / RESOLVED_CONFIG_FILE, resolved_yaml(cfg))
    log.info("run dir: %s (overrides: %s)", output_dir, " ".join(_task_overrides()) or "none")
    note = fitted_override_note(OmegaConf.to_container(cfg.anchors, resolve=True))
    if note:
        log.info(note)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
        # expected on a resume: the DataModule continues the data stream itself (its
        # state_dict), also mid-epoch; a run resumed in place finds its checkpoints dir full
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
    stopped_by = None
    with stop_on_signals() as received, _ddp_launch_env(trainer):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            stopped_by = received[0] if received else signal.SIGTERM
        except Exception as e:  # recorded (not a stale "interrupted" of the run resumed), raised
            if trainer.is_global_zero:
                failed = {"status": "failed", "error": f"{type(e).__name__}: {message_of(e)}"}
                write_metrics_json(output_dir / METRICS_FILE, collect_metrics(trainer) | failed)
            raise
    metrics = collect_metrics(trainer)
    metrics["wall_time_s"] = round(time.monotonic() - started, 3)  # start-up included
    nonfinite = module.nonfinite_state()
    metrics["status"] = "failed" if nonfinite else "interrupted" if stopped_by else "completed"
    metrics["tags"] = run_tags(cfg)
    if trainer.is_global_zero:
        write_metrics_json(output_dir / METRICS_FILE, metrics)
        shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
        log.info("final metrics: %s", json.dumps(shown, sort_keys=True))
        if launching_process():  # after DDP: the launching process alone
            _test_after_fit(cfg, output_dir, metrics)
    if stopped_by is not None:
        name = signal.Signals(stopped_by).name
        where = f"{name} at epoch {metrics['epoch']}, step {metrics['global_step']}"
        if (output_dir / "checkpoints" / "last.ckpt").is_file():
            arg = shlex.quote(f"resume={output_dir}")
            message = f"{where}; continue the run with: python -m ssd_lightning.train {arg}"
        else:  # stopped before its first checkpoint: nothing to continue from
            message = (
                f"{where}, before its first checkpoint; start it again with the same command "
                "and overwrite=true"
            )
        if trainer.is_global_zero:
            write_job_status(output_dir, "INTERRUPTED", message, overrides=_task_overrides())
        raise RunInterrupted(message, stopped_by)
    if nonfinite:
        raise NonFiniteWeightsError(
            f"the run ended with non-finite weights ({len(nonfinite)} of the network's tensors, "
            f"e.g. {', '.join(nonfinite[:3])}); its checkpoints/last.ckpt holds them, the "
            "exported best model only finite ones. Lower optimizer.lr, check the data and "
            "model.net.weights, or use trainer.precision=32-true."
        )
    return metrics


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: train, and return the value a sweeper (e.g. Optuna) optimizes:
    ``cfg.optimized_metric`` (checked before training)."""
    check_objective(cfg)
    return objective_value(cfg, train(cfg))


def main() -> None:
    child_argv = _ddp_child_argv(sys.argv)
    if child_argv is sys.argv:  # not a DDP child (a child gets its parent's resolved argv)
        try:
            refuse_existing_run_dir(sys.argv)  # before Hydra writes into that dir
            sys.argv = resume_argv(sys.argv)
            remember_run_config(sys.argv)
        except ConfigError as e:
            exit_with_error(e, "Config error")
    else:
        sys.argv = child_argv
    hydra_main("train", task)()


if __name__ == "__main__":
    main()
