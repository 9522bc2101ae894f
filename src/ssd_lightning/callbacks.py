"""Lightning callbacks: prediction images in TensorBoard, metrics.json, the exported best model."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from ssd_lightning.core.ssd import export_model
from ssd_lightning.data.dataset import CLASS_NAMES

log = logging.getLogger(__name__)


GT_COLOR = "lime"
PRED_COLOR = "red"


def draw_detections(image: Tensor, det: dict[str, Tensor], gt_boxes: Tensor | None = None,
                    class_names: list[str] | None = None, width: int = 2) -> Tensor:
    """image (3,H,W) float [0,1] or uint8; det boxes (K,4) xyxy in this image's pixels.

    Returns uint8 (3,H,W) with GT in green and predictions in red, labelled with their score.
    """
    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    img = img.cpu()
    if gt_boxes is not None and len(gt_boxes):
        img = draw_bounding_boxes(img, gt_boxes.detach().float().cpu(), colors=GT_COLOR,
                                  width=width)
    if len(det["boxes"]):
        names = class_names or CLASS_NAMES
        labels = [
            f"{names[int(c)] if int(c) < len(names) else int(c)} {float(s):.2f}"
            for c, s in zip(det["labels"].tolist(), det["scores"].tolist(), strict=True)
        ]
        img = draw_bounding_boxes(img, det["boxes"].detach().float().cpu(), labels=labels,
                                  colors=PRED_COLOR, width=width)
    return img


class PredictionImageLogger(Callback):
    """Every ``every_n_epochs`` (and on the first and last epoch), log a grid of the first
    validation images with predictions (red, prediction thresholds) and GT (green) to TensorBoard
    as ``val/predictions``. Without a validation split, training images are used instead
    (``train/predictions``)."""

    def __init__(self, every_n_epochs: int = 5, max_images: int = 8, nrow: int = 4):
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.prediction_images.every_n_epochs={every_n_epochs}: "
                             "must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images
        self.nrow = nrow

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        return epoch == 0 or last or (epoch + 1) % self.every_n_epochs == 0

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    @torch.no_grad()
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, tag: str) -> None:
        tensorboards = self._tensorboards(trainer)
        if not tensorboards or trainer.global_rank != 0:
            return
        n = min(self.max_images, len(batch.images))
        images = batch.images[:n]  # (n,3,S,S) [0,1]
        h, w = images.shape[-2:]
        sizes = torch.tensor([[h, w]] * n, device=images.device)  # boxes in network-input pixels
        was_training = pl_module.training
        pl_module.eval()
        try:
            dets = pl_module.net.detect(images, sizes, **pl_module.predict_cfg)
        finally:
            pl_module.train(was_training)
        drawn = [  # drawing is per image by nature; a handful of images every few epochs
            draw_detections(images[i], dets[i], batch.boxes[i][batch.mask[i]])
            for i in range(n)
        ]
        grid = make_grid(drawn, nrow=min(self.nrow, n), padding=4)
        for tb in tensorboards:
            tb.experiment.add_image(tag, grid, global_step=trainer.global_step)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and trainer.state.fn == "fit" \
                and self._due(trainer):
            self._log(trainer, pl_module, batch, "val/predictions")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and not trainer.num_val_batches and self._due(trainer):
            self._log(trainer, pl_module, batch, "train/predictions")


class AugmentationPreview(Callback):
    """At the start of the fit, log a figure of ``n`` augmented versions of training images
    (boxes drawn, fallbacks marked) to TensorBoard as ``data/augmentations``, so a run shows
    what its augmentation preset does."""

    def __init__(self, n: int = 8, indices: tuple[int, ...] = (0,), seed: int = 0):
        self.n, self.indices, self.seed = n, tuple(indices), seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboards = PredictionImageLogger._tensorboards(trainer)
        dataset = getattr(trainer.datamodule, "train_set", None)
        if not tensorboards or dataset is None or trainer.global_rank != 0:
            return
        from ssd_lightning.visualize import plot_augmentations

        for index in self.indices:
            if index >= len(dataset):
                continue
            fig = plot_augmentations(dataset, n=self.n, index=index, seed=self.seed)
            for tb in tensorboards:
                tb.experiment.add_figure(f"data/augmentations/{index}", fig, close=False,
                                         global_step=trainer.global_step)


def collect_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """The final scalar metrics of a fit, plus epoch/step and the best checkpoint."""
    out: dict[str, Any] = {}
    for k, v in sorted(trainer.callback_metrics.items()):
        if (isinstance(v, Tensor) and v.numel() == 1) or isinstance(v, int | float):
            out[k] = float(v)
    out["epoch"] = int(trainer.current_epoch)
    out["global_step"] = int(trainer.global_step)
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "best_model_path", ""):
        out["best_model_path"] = str(ckpt.best_model_path)
        out["best_monitor"] = str(ckpt.monitor)
        score = ckpt.best_model_score
        out["best_model_score"] = None if score is None else float(score)
    module = trainer.lightning_module
    if module is not None and hasattr(module, "nonfinite_total"):
        out["nonfinite_steps_skipped"] = int(module.nonfinite_total)
    return out


def write_metrics_json(path: str | Path, metrics: dict[str, Any]) -> Path:
    """JSON with NaN/inf written as null (strict JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in metrics.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


class ExportBestModel(Callback):
    """At the end of the fit, export the best checkpoint's network (or the final weights when
    there is no checkpoint, e.g. fast_dev_run) as a Lightning-free file:
    ``{"config": SSD constructor args, "state_dict": ..., "predict": thresholds, ...}``,
    loadable with ``ssd_lightning.core.load_model``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        net = pl_module.net
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        extra: dict[str, Any] = {
            "predict": dict(getattr(pl_module, "predict_cfg", {})),
            "evaluate": dict(getattr(pl_module, "eval_cfg", {})),
            "class_names": list(CLASS_NAMES),
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "source": "final weights",
        }
        if best and Path(best).is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            net = copy.deepcopy(pl_module.net).cpu()
            net.load_state_dict({k[len("net."):]: v for k, v in state.items()
                                 if k.startswith("net.")})
            score = ckpt.best_model_score
            extra.update(source=str(best), monitor=str(ckpt.monitor),
                         best_score=None if score is None else float(score))
        export_model(net, self.path, extra)
        log.info("best model exported to %s (%s)", self.path, extra["source"])
