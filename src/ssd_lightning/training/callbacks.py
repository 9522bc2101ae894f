"""Lightning callbacks: prediction images and figures, the augmentation preview, the best model
and last.ckpt."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from ssd_lightning.config.atomic import atomic_write
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.core.plain import is_number
from ssd_lightning.data.dataset import CLASS_NAMES
from ssd_lightning.training import epoch_sums
from ssd_lightning.training.checkpoint import export_model
from ssd_lightning.visualize import (
    figure_to_png,
    plot_augmentations,
    plot_feature_maps,
    plot_predictions,
    prediction_grid,
)

log = logging.getLogger(__name__)

FEATURE_MAPS_PNG = "feature_maps.png"
PREDICTIONS_PNG = "predictions.png"


def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class PredictionImages(Callback):
    """What the model sees and predicts, on the first ``max_images`` images of the first
    validation batch (training batch when there is no validation split):

    - every ``every_n_epochs`` epochs, and on the first and last: a grid of the images with
      predictions (red, the module's prediction thresholds, with scores) and ground truth (green)
      in TensorBoard as ``val/predictions`` (``train/predictions``);
    - at the end of the fit: ``<dirpath>/predictions.png`` (the same, as a titled figure) and
      ``<dirpath>/feature_maps.png`` (the six feature maps of the first image), also logged to
      TensorBoard as ``figures/predictions`` and ``figures/feature_maps``.

    ``dirpath``: where the PNGs go (the run dir in the config); None = the trainer's
    ``default_root_dir``. Boxes are drawn in network-input pixels of the images shown.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        max_images: int = 8,
        dirpath: str | Path | None = None,
        ncols: int = 4,
        dpi: int = 100,
    ):
        for key, value in (("every_n_epochs", every_n_epochs), ("max_images", max_images)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"callbacks.prediction_images.{key}={value!r}: allowed values are integers >= 1"
                )
        self.every_n_epochs, self.max_images = every_n_epochs, max_images
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.ncols, self.dpi = ncols, dpi
        # first images of the first val (or train) batch of the latest epoch, kept on the device:
        # images (n,3,S,S) in [0,1]; boxes (n,G,4) xyxy input pixels; mask (n,G)
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._source = ""
        self.written: list[Path] = []

    # -- capture (no extra data loading, no host sync) --------------------------------------------
    def _capture(self, batch: Any, source: str) -> None:
        n = self.max_images
        self._batch = (batch.images[:n].detach(), batch.boxes[:n], batch.mask[:n])
        self._source = source

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx == 0
            and dataloader_idx == 0
            and not trainer.sanity_checking
            and trainer.global_rank == 0
        ):
            self._capture(batch, "val")

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx == 0 and trainer.global_rank == 0 and not sum(trainer.num_val_batches):
            self._capture(batch, "train")

    # -- when -------------------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        return epoch == 0 or last or (epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._due(trainer):
            self.log_grid(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not sum(trainer.num_val_batches) and self._due(trainer):  # no validation this epoch
            self.log_grid(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_figures(trainer, pl_module)

    # -- what -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _detect(self, pl_module: L.LightningModule) -> tuple[Tensor, list[dict], list[Tensor]]:
        images, boxes, mask = self._batch
        dets = pl_module.eval_net.detect(images, **pl_module.predict_cfg)  # boxes in input pixels
        gts = [b[m] for b, m in zip(boxes, mask, strict=True)]
        return images, dets, gts

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The TensorBoard image grid (rank 0, TensorBoard loggers only)."""
        tensorboards = _tensorboards(trainer)
        if not tensorboards or trainer.global_rank != 0 or self._batch is None:
            return
        names = getattr(pl_module, "class_names", CLASS_NAMES)
        grid = prediction_grid(*self._detect(pl_module), ncols=self.ncols, class_names=names)
        for tb in tensorboards:
            tb.experiment.add_image(f"{self._source}/predictions", grid, trainer.global_step)

    def write_figures(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Both figures as PNGs in ``dirpath`` and in TensorBoard. Rank 0 only."""
        if trainer.global_rank != 0:
            return []
        if self._batch is None:
            log.warning("prediction images: no batch was seen during the fit; no figures written")
            return []
        images, dets, gts = self._detect(pl_module)
        step = trainer.global_step
        score = pl_module.predict_cfg["score_threshold"]
        figures = {
            FEATURE_MAPS_PNG: plot_feature_maps(
                pl_module.eval_net,
                images[0],
                title=f"feature maps ({self._source} image, step {step})",
            ),
            PREDICTIONS_PNG: plot_predictions(
                images,
                dets,
                gts,
                class_names=getattr(pl_module, "class_names", CLASS_NAMES),
                ncols=self.ncols,
                title=f"{self._source} predictions (red, score >= {score}) and GT (green), "
                f"step {step}",
            ),
        }
        outdir = self.dirpath or Path(trainer.default_root_dir)
        self.written = []
        for fname, fig in figures.items():
            for tb in _tensorboards(trainer):
                tb.experiment.add_figure(f"figures/{Path(fname).stem}", fig, step, close=False)
            self.written.append(figure_to_png(fig, outdir / fname, dpi=self.dpi))
        return self.written


class AugmentationPreview(Callback):
    """At the start of the fit, log a figure of ``n`` augmented versions of training images
    (boxes drawn, fallbacks marked) to TensorBoard as ``data/augmentations/<index>``, so a run
    shows what its augmentation preset does."""

    def __init__(self, n: int = 8, indices: tuple[int, ...] = (0,), seed: int = 0):
        self.n, self.indices, self.seed = n, tuple(indices), seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboards = _tensorboards(trainer)
        dataset = getattr(trainer.datamodule, "train_set", None)
        if not tensorboards or dataset is None or trainer.global_rank != 0:
            return
        for index in self.indices:
            if index >= len(dataset):
                continue
            fig = plot_augmentations(dataset, n=self.n, index=index, seed=self.seed)
            for tb in tensorboards:
                tb.experiment.add_figure(
                    f"data/augmentations/{index}", fig, trainer.global_step, close=False
                )


class BestModel(Callback):
    """``path``: the run's best network by ``monitor`` as the Lightning-free export (weights,
    model config, thresholds; see ``training.checkpoint``), rewritten atomically whenever the
    metric improves, so a run stopped at any point still has it. No optimizer state: about a
    quarter of a full checkpoint (~95 MB at 300 px). ``checkpoint``: optionally also keep the best
    epoch's whole training state there (a Lightning checkpoint, ~382 MB).

    Checked after each validation (after each training epoch when there is none). The record
    (best score, epoch, step, file) is part of every checkpoint, so a resumed run compares against
    the best before the interruption; resumed into another run dir, it starts from a copy of that
    run's best file. A fit that never measured the metric (e.g. fast_dev_run) exports its final
    weights at the end.
    """

    def __init__(
        self,
        path: str | Path,
        monitor: str = "val/map",
        mode: str = "max",
        checkpoint: str | Path | None = None,
    ):
        if mode not in ("max", "min"):
            raise ValueError(
                f"callbacks.model_checkpoint.mode={mode!r}: allowed values are max, min"
            )
        self.path, self.monitor, self.mode = Path(path), monitor, mode
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.best_file: str | None = None  # where the best export was written (its run dir's)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "best_file": self.best_file,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor:
            self.best_score = state_dict.get("best_score")
            self.best_epoch = state_dict.get("best_epoch")
            self.best_step = state_dict.get("best_step")
            self.best_file = state_dict.get("best_file")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # resumed into another run dir: bring the best so far along, or start the record afresh
        if self.best_file is None or Path(self.best_file).resolve() == self.path.resolve():
            return
        if Path(self.best_file).is_file():
            if trainer.is_global_zero:
                with atomic_write(self.path) as tmp:
                    shutil.copyfile(self.best_file, tmp)
            self.best_file = str(self.path)
        else:
            log.warning(
                "best model: %s (the resumed run's best) is gone; the best is tracked anew",
                self.best_file,
            )
            self.best_score = self.best_epoch = self.best_step = self.best_file = None

    def _improved(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        value = trainer.callback_metrics.get(self.monitor)
        # no validation yet in a run that validates every n > 1 epochs: nothing to judge now
        waiting = (
            self.monitor.startswith("val/")
            and trainer.check_val_every_n_epoch not in (None, 1)
            and not any(k.startswith("val/") for k in trainer.callback_metrics)
        )
        if value is None and waiting:
            return
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise ConfigError(
                f"callbacks.model_checkpoint.monitor={self.monitor}: the run logs no such metric "
                f"(logged: {logged})"
            )
        score = float(value)  # one host sync per epoch
        if not self._improved(score):
            return
        nonfinite = pl_module.nonfinite_state()
        if nonfinite:  # a score from broken weights is no best
            log.warning("best model: not exported, non-finite weights (%s)", nonfinite[0])
            return
        self.best_score = score
        self.best_epoch, self.best_step = int(trainer.current_epoch), int(trainer.global_step)
        self.best_file = str(self.path)
        if trainer.is_global_zero:
            self._export(trainer, pl_module, f"best {self.monitor} (epoch {self.best_epoch})")
        if self.checkpoint is not None:  # a collective call: every rank takes part
            trainer.save_checkpoint(self.checkpoint, weights_only=False)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, source: str) -> None:
        export_model(
            pl_module.eval_net,
            self.path,
            {
                "predict": dict(pl_module.predict_cfg),
                "evaluate": dict(pl_module.eval_cfg),
                "loss": pl_module.criterion.config,
                "class_names": list(getattr(pl_module, "class_names", CLASS_NAMES)),
                "epoch": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "source": source,
                "monitor": self.monitor,
                "best_score": self.best_score,
            },
        )
        log.info("best model exported to %s (%s)", self.path, source)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not sum(trainer.num_val_batches):  # no validation: judged on the training metrics
            self._check(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_file is None and trainer.is_global_zero and not pl_module.nonfinite_state():
            self._export(trainer, pl_module, "final weights")


def _last_epoch(trainer: L.Trainer) -> bool:
    """Whether the fit ends after this training epoch (its limits, or a callback's stop)."""
    epochs_done = trainer.current_epoch + 1 >= (trainer.max_epochs or 0) > 0
    steps_done = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
    return bool(trainer.should_stop or epochs_done or steps_done)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``: the whole training state (weights, optimizer, schedules, loops,
    data position, the best-model record) at the end of an epoch, and after the training batch
    at which SIGTERM / SIGINT stopped the run (Lightning stops there; see ``train.py``), so that a
    resumed run loses nothing. A stop during validation keeps the previous epoch's file: that
    epoch is then trained again on resume, exactly as before.

    Writing the file (~380 MB, synced to disk) takes about a second, as long as a whole epoch of
    Penn-Fudan on a GPU, so after the first epoch it is written again only once ``min_interval_s``
    seconds have passed since the last write (0: every epoch), and always at the run's last
    epoch: a kill -9 loses at most that much training, a SIGTERM nothing."""

    def __init__(
        self,
        dirpath: str | Path,
        filename: str = "last",
        every_n_epochs: int = 1,
        min_interval_s: float = 0.0,
    ):
        if not (is_number(min_interval_s, finite=False) and min_interval_s >= 0):
            raise ValueError(
                f"callbacks.last_checkpoint.min_interval_s={min_interval_s!r}: "
                "allowed values are numbers >= 0 (seconds; 0 = every epoch)"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
            # at each training epoch's end (after its validation, if any): left to Lightning,
            # a run that validates every n > 1 epochs would save only at its validations
            save_on_train_epoch_end=True,
        )
        self.min_interval_s = float(min_interval_s)
        self._saved_at: float | None = None  # time.monotonic() of this process's last write
        self._stopping = False  # saving the state a signal stopped the run at
        # the running sums of the epoch a signal stopped, until the resumed epoch logs again
        self._epoch_sums: dict[str, dict[str, Tensor]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_sums = {}  # sums the stopped epoch never logged again end with it
        due = self._saved_at is None or time.monotonic() - self._saved_at >= self.min_interval_s
        # every rank must take the same branch: a save is a collective (a barrier under DDP)
        if trainer.strategy.broadcast(due or _last_epoch(trainer), src=0):
            super().on_train_epoch_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at = time.monotonic()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # resumed into another run dir: the old dir's files are not this run's to manage (and
        # there is no best score here, which Lightning would warn about)
        if state_dict.get("dirpath") == self.dirpath:
            super().load_state_dict(state_dict)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # stopped in the middle of an epoch: its averages so far go along (see epoch_sums)
        if self._stopping:
            checkpoint[epoch_sums.CKPT_KEY] = epoch_sums.epoch_sums(trainer)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._epoch_sums = epoch_sums.restored(checkpoint)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        if self._epoch_sums:
            epoch_sums.fold_in(trainer, self._epoch_sums)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stopped_by_signal = isinstance(exception, SIGTERMException)
        if stopped_by_signal and not (trainer.sanity_checking or trainer.validating):
            path = self.format_checkpoint_name({})
            # every rank got the exception at the same batch; the whole state (weights_only=False:
            # also quiets Lightning's log line about the default)
            self._stopping = True
            try:
                trainer.save_checkpoint(path, weights_only=False)
            finally:
                self._stopping = False
            log.info("stopped by a signal: the state reached is saved in %s", path)
