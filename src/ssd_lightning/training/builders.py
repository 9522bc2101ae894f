"""From a composed train config to the objects of a fit: the LightningModule (with its network,
loss, optimizer and scheduler), the DataModule and the Trainer with its loggers and callbacks.
Every object comes from its ``_target_``; a constructor's complaint becomes a ``ConfigError``
naming the key."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from ssd_lightning.config.compose import instantiate_checked
from ssd_lightning.config.validation import validate_config
from ssd_lightning.training.callbacks import AugmentationPreview
from ssd_lightning.training.checkpoint_io import RunCheckpointIO
from ssd_lightning.training.lit_module import SSDLitModule
from ssd_lightning.training.progress import EpochLog
from ssd_lightning.training.run_outputs import run_info
from ssd_lightning.training.signals import StopTogether

log = logging.getLogger(__name__)

# callbacks that only write into a logger (PredictionImages also writes PNGs: it stays)
_NEED_LOGGER = (LearningRateMonitor, AugmentationPreview)


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [
        instantiate_checked(node, f"logger.{key}")
        for key, node in (cfg.get("logger") or {}).items()
        if isinstance(node, DictConfig) and node.get("_target_")
    ]


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[Callback]:
    out = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if not (isinstance(node, DictConfig) and node.get("_target_")):
            continue
        if key == "progress_bar" and not cfg.trainer.get("enable_progress_bar", True):
            continue
        cb = instantiate_checked(node, f"callbacks.{key}")
        if isinstance(cb, _NEED_LOGGER) and not has_logger:
            log.info("logger=none: callbacks.%s needs a logger, left out", key)
            continue
        out.append(cb)
    return out


def build(
    cfg: DictConfig, extra_callbacks: Sequence[Callback] = (), validated: bool = False
) -> tuple[SSDLitModule, L.LightningDataModule, L.Trainer]:
    """Validate ``cfg`` (unless the caller did: ``validated=True``) and build (module,
    datamodule, trainer)."""
    if not validated:
        validate_config(cfg)
    if torch.cuda.is_available():
        # fp32 matmuls outside autocast on TF32 tensor cores, as cuDNN's convolutions already
        # are (Lightning warns at every GPU run without it)
        torch.set_float32_matmul_precision("high")
    datamodule = instantiate_checked(cfg.data, "data")  # cheap: data mistakes fail first
    module = instantiate_checked(cfg.model, "model", run_info=run_info(cfg))
    loggers = build_loggers(cfg)
    # StopTogether: under DDP a SIGTERM stops every rank at the same batch (training.signals)
    # EpochLog: one line per epoch, whatever the bar (training.progress)
    callbacks = [
        *build_callbacks(cfg, has_logger=bool(loggers)),
        StopTogether(),
        EpochLog(),
        *extra_callbacks,
    ]
    checkpointing: dict[str, bool] = {}
    if "enable_checkpointing" not in cfg.trainer and not any(
        isinstance(cb, ModelCheckpoint) for cb in callbacks
    ):
        # without a checkpoint callback (callbacks=none) Lightning adds its own, which writes a
        # whole training state (~380 MB) per epoch that nothing reads: none means none
        checkpointing["enable_checkpointing"] = False
    trainer = instantiate_checked(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[RunCheckpointIO()],  # atomic checkpoint writes, weights-only reads
        **checkpointing,
    )
    return module, datamodule, trainer
