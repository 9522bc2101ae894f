"""`FigureLogger`: the feature-map and prediction figures of a training run, as PNGs in the run
dir and as TensorBoard figures.

At the end of the fit (and every ``every_n_epochs`` epochs if set) it takes the first images of
the first validation batch (training batch when there is no validation split), and writes

- ``<dirpath>/feature_maps.png``: the six feature maps of the first image (channel mean),
- ``<dirpath>/predictions.png``: predictions (red, the module's prediction thresholds) and GT
  (green), boxes in network-input pixels of the images shown,

and logs them to every TensorBoard logger as ``figures/feature_maps`` and
``figures/predictions``. Cost per call: one forward pass over ``max_images`` images plus two
matplotlib renders (well under a second at 300 px on a GPU, ~1-2 s on CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

log = logging.getLogger(__name__)

FEATURE_MAPS_PNG = "feature_maps.png"
PREDICTIONS_PNG = "predictions.png"


class FigureLogger(Callback):
    """Feature-map and prediction figures at fit end (and every ``every_n_epochs`` epochs).

    dirpath: where the PNGs go (the run dir, ``${paths.output_dir}`` in the config); None = the
    trainer's ``default_root_dir``. every_n_epochs: None/0 = only at the end of the fit; the PNGs
    are overwritten each time, TensorBoard keeps one figure per global step.
    max_images: images in the prediction grid. ncols: grid columns.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_epochs: int | None = None,
        max_images: int = 8,
        ncols: int = 4,
        dpi: int = 100,
    ):
        if every_n_epochs is not None and every_n_epochs < 0:
            raise ValueError(
                f"callbacks.figures.every_n_epochs={every_n_epochs}: must be null, 0 (fit end "
                "only) or a positive number of epochs"
            )
        if max_images < 1:
            raise ValueError(f"callbacks.figures.max_images={max_images}: must be >= 1")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.every_n_epochs = every_n_epochs or 0
        self.max_images = max_images
        self.ncols = ncols
        self.dpi = dpi
        # first images of the first val (or train) batch of the latest epoch, on CPU:
        # images (n,3,S,S) [0,1], GT boxes list of (G,4) xyxy network-input pixels
        self._images: Tensor | None = None
        self._boxes: list[Tensor] = []
        self._source = ""
        self._last_step: int | None = None  # global step of the last write (no duplicate at end)
        self.written: list[Path] = []

    # -- capture a few images (no extra data loading) ----------------------------------------------
    def _capture(self, batch: Any, source: str) -> None:
        n = min(self.max_images, len(batch.images))
        self._images = batch.images[:n].detach().cpu()
        self._boxes = [batch.boxes[i][batch.mask[i]].detach().cpu() for i in range(n)]
        self._source = source

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking \
                and trainer.global_rank == 0:
            self._capture(batch, "val")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and trainer.global_rank == 0 and self._source != "val":
            self._capture(batch, "train")

    # -- when --------------------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._due(trainer):
            self.write(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not sum(trainer.num_val_batches) and self._due(trainer):  # no validation this epoch
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step != trainer.global_step:  # not already written for this state
            self.write(trainer, pl_module)

    # -- what --------------------------------------------------------------------------------------
    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Render both figures from the captured images; PNGs + TensorBoard. Rank 0 only."""
        if trainer.global_rank != 0:
            return []
        if self._images is None:
            log.warning("FigureLogger: no batch was seen during the fit; no figures written")
            return []
        from ssd_lightning.visualize import (
            detect_on_inputs,
            figure_to_png,
            plot_feature_maps,
            plot_predictions,
        )

        net = pl_module.net
        images = self._images.to(pl_module.device)
        thresholds = dict(getattr(pl_module, "predict_cfg", {}))
        dets = detect_on_inputs(net, images, **thresholds)  # boxes in network-input pixels
        step = trainer.global_step
        figures = {
            FEATURE_MAPS_PNG: plot_feature_maps(
                net, images[0], title=f"feature maps ({self._source} image, step {step})"
            ),
            PREDICTIONS_PNG: plot_predictions(
                images.cpu(), [{k: v.cpu() for k, v in d.items()} for d in dets], self._boxes,
                ncols=self.ncols,
                title=f"{self._source} predictions (red, score >= "
                      f"{thresholds.get('score_threshold', 0.5)}) and GT (green), step {step}",
            ),
        }
        outdir = self.dirpath or Path(trainer.default_root_dir)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        written = []
        for fname, fig in figures.items():
            for tb in tensorboards:
                tb.experiment.add_figure(f"figures/{Path(fname).stem}", fig,
                                         global_step=trainer.global_step, close=False)
            written.append(figure_to_png(fig, outdir / fname, dpi=self.dpi))
        self.written = written
        self._last_step = trainer.global_step
        return written
