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

import hydra
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.config import (
    config_path_or_exit,
    instantiate_checked,
    run_task,
    validate_config,
)

log = logging.getLogger(__name__)

# Lightning's DDP launcher re-runs this script for ranks > 0 with Hydra's argv. The parent passes
# its run dir and its job's overrides through these variables, so a child joins the parent's run
# dir (no stray dirs) and runs the same job even inside a -m sweep (see _ddp_child_argv).
DDP_RUN_DIR_ENV = "SSD_LIGHTNING_DDP_RUN_DIR"
DDP_OVERRIDES_ENV = "SSD_LIGHTNING_DDP_OVERRIDES"
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE",
            DDP_RUN_DIR_ENV, DDP_OVERRIDES_ENV)


def _choices() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_info(cfg: DictConfig) -> dict[str, Any]:
    """The settings shown side by side in TensorBoard's HPARAMS tab."""
    choices = _choices()
    sel = OmegaConf.select
    anchors = sel(cfg, "anchors") or {}
    target = str(sel(cfg, "optimizer._target_", default="?"))
    info = {
        "anchors": sel(cfg, "anchors.name") or choices.get("anchors", "?"),
        "anchor_ratios": str(OmegaConf.to_container(anchors.ratios)
                             if "ratios" in anchors else "pairs"),
        "anchor_scales": str(OmegaConf.to_container(anchors.scales)
                             if "scales" in anchors else "pairs"),
        "extra_square": bool(anchors.get("extra_square", True)),
        "augmentation": choices.get("augmentation") or sel(cfg, "augmentation.name") or "?",
        "optimizer": target.rsplit(".", 1)[-1],
        "lr": sel(cfg, "optimizer.lr"),
        "scheduler": choices.get("scheduler") or ("none" if not sel(cfg, "scheduler") else "?"),
        "batch_size": sel(cfg, "data.batch_size"),
        "val_size": sel(cfg, "data.val_size"),
        "max_epochs": sel(cfg, "trainer.max_epochs"),
        "precision": str(sel(cfg, "trainer.precision")),
        "neg_ratio": sel(cfg, "model.loss.neg_ratio"),
        "head_kernel_size": sel(cfg, "model.net.head_kernel_size"),
        "seed": sel(cfg, "seed"),
        "experiment": choices.get("experiment") or "none",
    }
    return {k: ("none" if v is None else v) for k, v in info.items()}


def build_module(cfg: DictConfig) -> Any:
    """The LightningModule with the network and loss injected, from ``cfg.model``,
    ``cfg.optimizer`` and ``cfg.scheduler``."""
    from ssd_lightning.lit_module import SSDLitModule

    net = instantiate_checked(cfg.model.net, "model.net")
    loss = instantiate_checked(cfg.model.loss, "model.loss")
    optimizer = instantiate_checked(cfg.optimizer, "optimizer")
    scheduler, interval = None, "step"
    sched_cfg = cfg.get("scheduler")
    if sched_cfg and sched_cfg.get("_target_"):
        sched_cfg = OmegaConf.masked_copy(sched_cfg, [k for k in sched_cfg if k != "interval"])
        interval = str(cfg.scheduler.get("interval", "step"))
        scheduler = instantiate_checked(sched_cfg, "scheduler")
    return SSDLitModule(
        net=net,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval=interval,
        predict=OmegaConf.to_container(cfg.model.predict),
        evaluate=OmegaConf.to_container(cfg.model.evaluate),
        max_nonfinite_steps=int(cfg.model.get("max_nonfinite_steps", 10)),
        run_info=run_info(cfg),
    )


def build_loggers(cfg: DictConfig) -> list[Any]:
    out = []
    for key, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and node.get("_target_"):
            out.append(instantiate_checked(node, f"logger.{key}"))
    return out


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ssd_lightning.callbacks import AugmentationPreview, PredictionImageLogger

    out = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if not (isinstance(node, DictConfig) and node.get("_target_")):
            continue
        if key == "progress_bar" and not cfg.trainer.get("enable_progress_bar", True):
            continue
        cb = instantiate_checked(node, f"callbacks.{key}")
        if not has_logger and isinstance(
                cb, LearningRateMonitor | PredictionImageLogger | AugmentationPreview):
            log.info("logger=none: callbacks.%s needs a logger, left out", key)
            continue
        out.append(cb)
    return out


@contextlib.contextmanager
def _ddp_launch_env(trainer: Any) -> Iterator[None]:
    """For Lightning's script launcher (DDP with start_method=popen): tell the children which run
    dir and overrides to use, and afterwards undo the DDP environment so that the next job of a
    sweep launches its own children instead of waiting for ranks that are gone."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    is_launcher = (isinstance(launcher, _SubprocessScriptLauncher) and HydraConfig.initialized()
                   and not launcher.cluster_environment.creates_processes_externally)
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
        import torch.distributed as dist

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
    return [argv[0], *overrides, f'hydra.run.dir="{run_dir}"',
            f"hydra.job.name=train_ddp_process_{rank}", "hydra.output_subdir=null"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate the config, build data/model/trainer, fit, and return the final metrics
    (also written to ``<run dir>/metrics.json``)."""
    import lightning as L

    from ssd_lightning.callbacks import collect_metrics, write_metrics_json

    started = time.monotonic()
    validate_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks,
                                  logger=loggers or False)
    datamodule = instantiate_checked(cfg.data, "data")
    module = build_module(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero and os.environ.get("LOCAL_RANK", "0") == "0":
        output_dir.mkdir(parents=True, exist_ok=True)
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(job_cfg, resolve=True))
    log.info("run dir: %s (overrides: %s)", output_dir, " ".join(_task_overrides()) or "none")
    with _ddp_launch_env(trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = collect_metrics(trainer)
    metrics["wall_time_s"] = round(time.monotonic() - started, 3)  # start-up included
    if trainer.is_global_zero:
        write_metrics_json(output_dir / "metrics.json", metrics)
        shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
        log.info("final metrics: %s", json.dumps(shown, sort_keys=True))
    return metrics


def _run(cfg: DictConfig) -> float | None:
    metrics = run_task(train, cfg)
    # the value a Hydra sweeper (e.g. Optuna) optimizes
    value = metrics.get("val/map_50", metrics.get("train/loss"))
    return None if value is None else float(value)


def main() -> None:
    sys.argv = _ddp_child_argv(sys.argv)
    path = config_path_or_exit()
    hydra.main(version_base="1.3", config_path=path, config_name="train")(_run)()


if __name__ == "__main__":
    main()
