"""Train the SSD: ``python -m ssd_lightning.train [hydra overrides]``.

Examples::

    python -m ssd_lightning.train                                   # the default recipe
    python -m ssd_lightning.train anchors=ssd augmentation=light trainer=gpu
    python -m ssd_lightning.train -m anchors=tall_skinny,ssd         # a sweep, one dir per job
    python -m ssd_lightning.train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt  # resume

``train(cfg)`` does the work and is what tests call; ``main`` is the thin Hydra entry point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig

from ssd_lightning.config.cli import hydra_main
from ssd_lightning.tools.search import check_objective, objective_value
from ssd_lightning.training.builders import build
from ssd_lightning.training.run_outputs import (
    METRICS_FILE,
    collect_metrics,
    write_metrics_json,
    write_resolved_config,
)

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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate the config, build data/model/trainer, fit, and return the final metrics
    (also written to ``<run dir>/metrics.json``)."""
    started = time.monotonic()
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    module, datamodule, trainer = build(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero and os.environ.get("LOCAL_RANK", "0") == "0":
        write_resolved_config(cfg, output_dir)
    log.info("run dir: %s (overrides: %s)", output_dir, " ".join(_task_overrides()) or "none")
    with _ddp_launch_env(trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = collect_metrics(trainer)
    metrics["wall_time_s"] = round(time.monotonic() - started, 3)  # start-up included
    if trainer.is_global_zero:
        write_metrics_json(output_dir / METRICS_FILE, metrics)
        shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
        log.info("final metrics: %s", json.dumps(shown, sort_keys=True))
    return metrics


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: train, and return the value a sweeper (e.g. Optuna) optimizes:
    ``cfg.optimized_metric`` (checked before training)."""
    check_objective(cfg)
    return objective_value(cfg, train(cfg))


def main() -> None:
    sys.argv = _ddp_child_argv(sys.argv)
    hydra_main("train", task)()


if __name__ == "__main__":
    main()
