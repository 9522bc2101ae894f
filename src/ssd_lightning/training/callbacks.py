"""Lightning callbacks: prediction images and figures, the augmentation preview, the best-model
export."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ssd_lightning.data.dataset import CLASS_NAMES
from ssd_lightning.training.checkpoint import build_net, export_model, net_state, read_checkpoint
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
        dets = pl_module.net.detect(images, **pl_module.predict_cfg)  # boxes in input pixels
        gts = [b[m] for b, m in zip(boxes, mask, strict=True)]
        return images, dets, gts

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The TensorBoard image grid (rank 0, TensorBoard loggers only)."""
        tensorboards = _tensorboards(trainer)
        if not tensorboards or trainer.global_rank != 0 or self._batch is None:
            return
        grid = prediction_grid(*self._detect(pl_module), ncols=self.ncols)
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
                pl_module.net, images[0], title=f"feature maps ({self._source} image, step {step})"
            ),
            PREDICTIONS_PNG: plot_predictions(
                images,
                dets,
                gts,
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


class ExportBestModel(Callback):
    """At the end of the fit, export the best checkpoint's network (or the final weights when
    there is no checkpoint, e.g. fast_dev_run) as a Lightning-free file (see
    ``training.checkpoint``), loadable with ``training.checkpoint.load_model``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        net = pl_module.net
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        extra: dict[str, Any] = {
            "predict": dict(pl_module.predict_cfg),
            "evaluate": dict(pl_module.eval_cfg),
            "class_names": list(CLASS_NAMES),
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "source": "final weights",
        }
        if best and Path(best).is_file():
            blob = read_checkpoint(best)
            net = build_net(copy.deepcopy(pl_module.net.config), net_state(blob), best)
            score = ckpt.best_model_score
            extra.update(
                source=str(best),
                monitor=str(ckpt.monitor),
                best_score=None if score is None else float(score),
                epoch=blob.get("epoch"),
                global_step=blob.get("global_step"),
            )
        export_model(net, self.path, extra)
        log.info("best model exported to %s (%s)", self.path, extra["source"])
