"""What a run leaves besides its checkpoints: ``metrics.json``, ``config_resolved.yaml`` and the
TensorBoard HPARAMS summary (one row per run, so a sweep's runs compare side by side)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

from ssd_lightning.config.atomic import atomic_write, write_json
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.training.callbacks import BestModel

METRICS_FILE = "metrics.json"
RESOLVED_CONFIG_FILE = "config_resolved.yaml"
EVAL_METRICS_FILE = "eval_metrics.json"  # test_after_fit: what `ssd_lightning.evaluate` writes
# the metric columns of the HPARAMS tab (TensorBoard shows each one's latest value)
HPARAM_METRICS = ("val/map_50", "val/map", "train/loss_epoch")


def _compact(anchors: Any, key: str) -> str:
    """A scales + ratios preset's ``key`` as text; "pairs" for a preset that lists its pairs."""
    value = anchors.get(key) if anchors else None
    if value is None:
        return "pairs"
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def _choices() -> dict[str, Any]:
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def run_tags(cfg: DictConfig) -> list[str]:
    """The run's ``tags`` as a list of strings (a single value counts as one tag)."""
    tags = OmegaConf.select(cfg, "tags")
    if tags is None:
        return []
    if isinstance(tags, str | int | float):  # tags=baseline
        tags = [tags]
    items = OmegaConf.to_container(tags) if OmegaConf.is_config(tags) else tags
    if not isinstance(items, list) or not all(isinstance(t, str | int | float) for t in items):
        raise ConfigError(f"tags: a list of words, e.g. tags=[baseline,v2]; got {tags!r}")
    return [str(t) for t in items]


def run_info(cfg: DictConfig) -> dict[str, Any]:
    """The settings shown side by side in TensorBoard's HPARAMS tab (plain values)."""
    choices = _choices()
    sel = OmegaConf.select
    anchors = sel(cfg, "anchors") or {}
    target = str(sel(cfg, "model.optimizer._target_", default="?"))
    info = {
        "anchors": sel(cfg, "anchors.name") or choices.get("anchors", "?"),
        "anchor_ratios": _compact(anchors, "ratios"),
        "anchor_scales": _compact(anchors, "scales"),
        "extra_square": bool(anchors.get("extra_square", True)),
        "augmentation": choices.get("augmentation") or sel(cfg, "augmentation.name") or "?",
        "optimizer": target.rsplit(".", 1)[-1],
        "lr": sel(cfg, "model.optimizer.lr"),
        "scheduler": choices.get("scheduler") or ("none" if not sel(cfg, "scheduler") else "?"),
        "batch_size": sel(cfg, "data.batch_size"),
        "val_size": sel(cfg, "data.val_size"),
        "max_epochs": sel(cfg, "trainer.max_epochs"),
        "precision": str(sel(cfg, "trainer.precision")),
        "neg_ratio": sel(cfg, "model.loss.neg_ratio"),
        "box_loss": sel(cfg, "model.loss.box_loss"),
        "head_kernel_size": sel(cfg, "model.net.head_kernel_size"),
        "ema_decay": sel(cfg, "model.ema_decay"),
        "seed": sel(cfg, "seed"),
        "experiment": choices.get("experiment") or "none",
        # one string: TensorBoard's HPARAMS filter matches it with a regex
        "tags": ",".join(run_tags(cfg)) or "none",
    }
    return {k: ("none" if v is None else v) for k, v in info.items()}


def log_hparams_tensorboard(trainer: L.Trainer, params: Mapping[str, Any]) -> None:
    """Write the HPARAMS-tab summary into every TensorBoard logger's run.

    The metric columns are the scalar tags the run logs; TensorBoard shows their latest value, so
    the final mAP appears without logging a fake 0 at step 0 (which
    ``TensorBoardLogger.log_hyperparams(params, metrics)`` would do).
    """
    if trainer.global_rank != 0:
        return
    params = {
        k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in params.items()
    }
    metrics = dict.fromkeys(HPARAM_METRICS, float("nan"))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params)  # hparams.yaml next to the events
            writer = logger.experiment._get_file_writer()
            for summary in hparams(params, metrics):
                writer.add_summary(summary)
            writer.flush()


def collect_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """The final scalar metrics of a fit, plus epoch/step and the best checkpoint. A resumed fit
    starts from those logged before its checkpoint: a run resumed after its last epoch, or after
    its last validation, reports what the run did, as the uninterrupted run would."""
    module = trainer.lightning_module
    out: dict[str, Any] = dict(getattr(module, "restored_metrics", None) or {})
    for k, v in sorted(trainer.callback_metrics.items()):
        if (isinstance(v, Tensor) and v.numel() == 1) or isinstance(v, int | float):
            out[k] = float(v)
    out["epoch"] = int(trainer.current_epoch)
    out["global_step"] = int(trainer.global_step)
    best = next((cb for cb in trainer.callbacks if isinstance(cb, BestModel)), None)
    if best is not None and best.best_file is not None:
        out["best_model_path"] = best.best_file
        out["best_monitor"] = best.monitor
        out["best_model_score"] = best.best_score
        out["best_epoch"] = best.best_epoch
    if module is not None and hasattr(module, "nonfinite_total"):
        out["nonfinite_steps_skipped"] = int(module.nonfinite_total)
    return out


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """JSON with NaN/inf written as null (strict JSON), written atomically."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }
    return write_json(path, clean, sort_keys=True)


def resolved_yaml(cfg: DictConfig) -> str:
    """The job's config (Hydra's own left out) as YAML, every interpolation resolved."""
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_yaml(job_cfg, resolve=True)


def write_resolved_config(cfg: DictConfig, output_dir: Path) -> Path:
    """``<run dir>/config_resolved.yaml``: the job's config with every interpolation resolved."""
    path = output_dir / RESOLVED_CONFIG_FILE
    with atomic_write(path) as tmp:
        tmp.write_text(resolved_yaml(cfg))
    return path
