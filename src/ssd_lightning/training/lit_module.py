"""The LightningModule: a thin shell over the plain-PyTorch core (``ssd_lightning.core``).

The ``SSD`` network and the ``MultiBoxLoss`` are built from the config and injected; this module
adds the optimizer/scheduler, logging, COCO evaluation with torchmetrics, the guard against
non-finite losses and, optionally, an exponential moving average of the weights (``training.ema``).

Box formats at this boundary: ``Batch.boxes`` are xyxy in network-input pixels [0, S]; the loss
takes them normalized to [0, 1]; detections and the mAP targets are xyxy in original image pixels.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics.detection import MeanAveragePrecision

from ssd_lightning.config.errors import ConfigError, RunFailed
from ssd_lightning.config.validation import takes_total_steps
from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.postprocess import (
    EVALUATE_DEFAULTS,
    PREDICT_DEFAULTS,
    check_thresholds,
    postprocess,
)
from ssd_lightning.core.ssd import SSD
from ssd_lightning.core.step import forward_with_loss
from ssd_lightning.data.dataset import CLASS_NAMES
from ssd_lightning.training.checkpoint import CKPT_KEY, EMA_PREFIX, NET_PREFIX
from ssd_lightning.training.ema import EMA
from ssd_lightning.training.run_outputs import log_hparams_tensorboard

log = logging.getLogger(__name__)
# faster_coco_eval logs the whole COCO summary at INFO on every evaluation; the numbers are logged
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

# the mAP entries logged as scalars (the rest are per-class or per-size tensors / sizes)
MAP_KEYS = ("map", "map_50", "map_75", "mar_100")
# every scalar a run logs per epoch (metrics.json, TensorBoard): what a search may optimize
LOGGED_METRICS = (
    "train/loss",  # also as train/loss_epoch (and train/loss_step in TensorBoard)
    "train/loss_epoch",
    "train/loss_box",
    "train/loss_cls",
    "train/num_pos",
    "train/accuracy",
    "train/box_mae",
    "train/fallback_rate",
    "train/fallback2_rate",
    "val/loss",
    *(f"val/{k}" for k in MAP_KEYS),
)


def map_backend() -> str:
    """torchmetrics' COCO backend: faster_coco_eval when installed, else pycocotools."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def _start_momentum(optimizer: torch.optim.SGD) -> None:
    """Zero momentum buffers where fused SGD has none yet. It creates them uninitialized in its
    first step and fills them there, unless ``found_inf`` skips that step: the next one would
    then add garbage to the weights. From zero, a first step is the same (buffer = gradient,
    without dampening, the only case it applies to)."""
    for group in optimizer.param_groups:
        if not group["momentum"] or group["dampening"]:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if p.grad is not None and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)


class NonFiniteLossError(RunFailed):
    """The loss stayed NaN/inf for too many consecutive steps."""


class NonFiniteWeightsError(RunFailed):
    """A fit ended with NaN/inf in the network's weights or buffers."""


class SSDLitModule(L.LightningModule):
    """SSD training/validation/prediction around an injected ``SSD`` and ``MultiBoxLoss``.

    ``optimizer`` is a factory ``params -> Optimizer`` (a Hydra ``_partial_``); ``scheduler`` an
    optional factory ``optimizer[, total_steps] -> LRScheduler``, stepped every
    ``scheduler_interval``.
    ``run_info`` is a flat dict of run settings shown in TensorBoard's HPARAMS tab.
    ``ema_decay``: also keep an exponential moving average of the network (``self.ema.net``),
    which is then the network validated, exported and used for predictions (``eval_net``);
    None = off.
    """

    def __init__(
        self,
        net: SSD,
        loss: MultiBoxLoss | None = None,
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        predict: Mapping[str, Any] | None = None,
        evaluate: Mapping[str, Any] | None = None,
        max_nonfinite_steps: int = 10,
        run_info: Mapping[str, Any] | None = None,
        ema_decay: float | None = None,
    ):
        super().__init__()
        self.net = net
        self.ema = EMA(net, ema_decay) if ema_decay is not None else None
        self._ema_step = 0  # the optimizer step the average was last updated after
        # () float on the device, 1.0 when this optimizer step is skipped (None: known good):
        # the average skips it too (on_train_batch_end)
        self._step_bad: Tensor | None = None
        self.criterion = loss if loss is not None else MultiBoxLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.predict_cfg = check_thresholds(
            {**PREDICT_DEFAULTS, **(predict or {})}, "model.predict"
        )
        self.eval_cfg = check_thresholds(
            {**EVALUATE_DEFAULTS, **(evaluate or {})}, "model.evaluate"
        )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"model.scheduler_interval={scheduler_interval!r}: allowed values are step, epoch"
            )
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(
                f"model.max_nonfinite_steps={max_nonfinite_steps!r}: allowed values are "
                "integers >= 1"
            )
        self.max_nonfinite_steps = max_nonfinite_steps
        self.run_info = dict(run_info or {})
        # Plain values only (factories and modules are rebuilt from the config / checkpoint entry).
        self.save_hyperparameters(
            {
                "predict": self.predict_cfg,
                "evaluate": self.eval_cfg,
                "max_nonfinite_steps": self.max_nonfinite_steps,
                "run_info": self.run_info,
                "ema_decay": ema_decay,
            },
            logger=False,
        )
        # per-class AP where there is more than one class (evaluate prints it beside the table)
        self.val_map = MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            backend=map_backend(),
            class_metrics=int(net.num_classes) > 2,
        )
        # index = label; the training data's (set in setup), saved with the model
        self.class_names: list[str] = list(CLASS_NAMES)
        self.nonfinite_total = 0  # steps skipped, as last read from the device counters
        # device-side counters, read rarely (see on_before_optimizer_step)
        self._nonfinite_total = torch.zeros(())
        self._nonfinite_streak = torch.zeros(())
        self._checked_step = 0
        # the network's saved buffers (BatchNorm statistics), grouped by dtype, and their values
        # before this step's forward: a skipped step puts them back (see _restore_buffers)
        self._state_buffers: list[list[Tensor]] = []
        self._buffers_before: list[Tensor] | None = None
        self.last_map: dict[str, float] = {}  # every scalar of the last mAP computation
        self.last_map_per_class: dict[str, float] = {}  # class name -> AP (several classes)
        # the scalar metrics logged before the checkpoint a run resumed from: a resumed fit
        # that logs nothing (already finished) or does not validate again still reports them
        self.restored_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        if names:  # the data decides what the labels mean
            if len(names) != self.net.num_classes:
                raise ConfigError(
                    f"model.net.num_classes={self.net.num_classes} but the data has "
                    f"{len(names) - 1} class(es) + background ({', '.join(names[1:])})"
                )
            self.class_names = list(names)

    # ---------------------------------------------------------------------------------------------
    @property
    def eval_net(self) -> SSD:
        """The network validated, exported and used for predictions: the moving average when
        there is one, else the trained network itself."""
        return self.net if self.ema is None else self.ema.net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B,3,S,S) in [0,1] -> loc (B,N,4), logits (B,N,C)."""
        return self.net(images)

    def _step(self, batch: Any, net: SSD | None = None) -> tuple[Tensor, Tensor, Any]:
        mask = batch.mask if batch.crowd is None else batch.mask & ~batch.crowd  # crowd: no target
        return forward_with_loss(
            self.net if net is None else net,
            self.criterion,
            batch.images,
            batch.boxes,
            batch.labels,
            mask,
        )

    @staticmethod
    def _fused(optimizer: Optimizer) -> bool:
        return all(group.get("fused") for group in optimizer.param_groups)

    def _snapshot_buffers(self) -> None:
        """Keep the saved buffers' values from before the first forward of an optimizer step
        (BatchNorm updates its running statistics in the forward, before the step is judged)."""
        if self._buffers_before is None:
            self._buffers_before = [
                torch.cat([b.reshape(-1) for b in g]) for g in self._state_buffers
            ]

    def _restore_buffers(self, bad: Tensor) -> None:
        """bad: () float, 1.0 when the step is skipped: every saved buffer then gets its value from
        before the step's forward back. Decided on the device (no host sync), a few launches: one
        flat tensor per dtype."""
        before, self._buffers_before = self._buffers_before, None
        if before is None:
            return
        skip = bad.bool()
        for group, old in zip(self._state_buffers, before, strict=True):
            kept = torch.where(skip, old, torch.cat([b.reshape(-1) for b in group]))
            parts = kept.split([b.numel() for b in group])
            torch._foreach_copy_(
                group, [p.view(b.shape) for p, b in zip(parts, group, strict=True)]
            )

    def _count_nonfinite(self, bad: Tensor) -> None:
        """bad: () float, 1.0 when this step is skipped. Device-side counters, read rarely."""
        self._nonfinite_streak = (self._nonfinite_streak.to(bad) + 1) * bad
        self._nonfinite_total = self._nonfinite_total.to(bad) + bad

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Make a step with non-finite gradients leave the weights and the buffers (BatchNorm's
        running statistics, already moved by the forward) untouched, without a host sync.

        With a fused optimizer (the configs' default) the decision stays on the device: the
        optimizer's ``found_inf`` makes the fused kernel skip the update, as AMP's GradScaler
        does. It is taken from the gradients after backward, i.e. after DDP's all-reduce, so
        every rank decides alike with no extra collective, and it also catches a finite loss with
        overflowing gradients. The counters are read every ``log_every_n_steps`` steps.
        (Other optimizers: see training_step, one host sync per step.)
        """
        if not self._fused(optimizer):
            return
        if isinstance(optimizer, torch.optim.SGD):
            _start_momentum(optimizer)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=self.device)]
        bad = (~torch.isfinite(torch.stack(norms).sum())).float()
        optimizer.found_inf = bad
        self._step_bad = bad
        self._restore_buffers(bad)
        self._count_nonfinite(bad)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        total, streak = int(self._nonfinite_total.item()), int(self._nonfinite_streak.item())
        if total > self.nonfinite_total:
            log.warning(
                "non-finite loss/gradients: %d step(s) skipped since step %d (%d in total)",
                total - self.nonfinite_total,
                self._checked_step,
                total,
            )
            self.nonfinite_total = total
        self._checked_step = self.global_step
        if streak >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss or its gradients were non-finite for {streak} consecutive steps "
                f"(model.max_nonfinite_steps={self.max_nonfinite_steps}); the weights were "
                "not updated by those steps. Lower optimizer.lr, check the data and anchors, "
                "or use trainer.precision=32-true."
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        self._snapshot_buffers()
        _, _, out = self._step(batch)
        bs = len(batch.images)
        if not self._fused(self.optimizers().optimizer):
            # without a fused kernel to skip on the device, decide here: one host sync per step
            bad = (~torch.isfinite(out.total.detach())).float()
            if self.trainer.world_size > 1:  # every rank must skip together
                bad = self.trainer.strategy.reduce(bad, reduce_op="max")
            self._count_nonfinite(bad)
            self._check_nonfinite()
            if bad.item():
                self._restore_buffers(bad)  # not before a backward: it saved the statistics
                self._step_bad = bad  # the last batch of a step decides whether it is taken
                return None  # Lightning skips backward and the optimizer step
            self._buffers_before = None
            self._step_bad = None
        # the progress bar reads it (a host sync) at its refresh rate, log_every_n_steps by default
        self.log(
            "train/loss",
            out.total,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=bs,
        )
        fallback = getattr(batch, "fallback", None)
        stats = {
            "train/loss_box": out.box,
            "train/loss_cls": out.cls,
            "train/num_pos": out.num_pos.float().mean(),  # positive anchors per image
            "train/accuracy": out.accuracy,  # anchor classification accuracy (pos + mined neg)
            "train/box_mae": out.box_mae,  # mean |offset error| on positives, encoded units
        }
        if fallback is not None:
            stats["train/fallback_rate"] = (fallback > 0).float().mean()  # any empty-box fallback
            stats["train/fallback2_rate"] = (fallback == 2).float().mean()  # resize-only fallback
        self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True, batch_size=bs)
        return out.total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after each optimizer step (not each batch when gradients are accumulated); a skipped
        # non-finite step leaves the average as it was, like the weights and buffers
        step = self.trainer.global_step
        if self.ema is not None and step > self._ema_step:
            self.ema.update(self.net, step, skipped=self._step_bad)
            self._ema_step = step
            self._step_bad = None

    # ---------------------------------------------------------------------------------------------
    def _targets(self, batch: Any) -> list[dict[str, Tensor]]:
        """GT boxes in original image pixels, one dict per image (torchmetrics' format)."""
        h, w = batch.images.shape[-2:]
        hw = batch.orig_sizes.to(batch.boxes)  # (B,2) (h, w)
        scale = torch.stack([hw[:, 1] / w, hw[:, 0] / h, hw[:, 1] / w, hw[:, 0] / h], -1)
        boxes = batch.boxes * scale[:, None]  # (B,G,4) xyxy original pixels
        targets = [
            {"boxes": b[m], "labels": lab[m]}
            for b, lab, m in zip(boxes, batch.labels, batch.mask, strict=True)
        ]
        if batch.crowd is not None:  # COCO's rule: a detection on a crowd region is ignored
            for t, c, m in zip(targets, batch.crowd, batch.mask, strict=True):
                t["iscrowd"] = c[m].long()
        return targets

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loc, logits, out = self._step(batch, self.eval_net)
        self.log(
            "val/loss",
            out.total,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(batch.images),
        )
        preds = postprocess(
            loc, logits, self.eval_net.anchors_cxcywh, batch.orig_sizes, **self.eval_cfg
        )
        self.val_map.update(preds, self._targets(batch))

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()  # synced across ranks by torchmetrics
        self.val_map.reset()
        self.last_map = {
            k: float(v)
            for k, v in result.items()
            if isinstance(v, Tensor) and v.numel() == 1 and k != "classes"
        }
        self.last_map_per_class = {}
        if self.val_map.class_metrics:  # (C,) APs of the classes seen, in result["classes"]
            names = self.class_names
            classes = result["classes"].reshape(-1).tolist()
            aps = result["map_per_class"].reshape(-1).tolist()
            for c, ap in zip(classes, aps, strict=True):
                self.last_map_per_class[names[c] if 0 <= c < len(names) else str(c)] = ap
        # Only scalars are logged: per-class / per-size entries are tensors or -1 placeholders.
        # sync_dist only averages identical values; it keeps Lightning's DDP check quiet
        # (torchmetrics returns them on the CPU; NCCL reduces device tensors only)
        for k in MAP_KEYS:
            value = result[k].float().to(self.device)
            self.log(f"val/{k}", value, prog_bar=k == "map_50", sync_dist=True)

    # ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (
            lambda params: torch.optim.Adam(params, lr=1e-3, fused=True)
        )
        # the moving average (frozen) is not trained
        optimizer = factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        if takes_total_steps(self.scheduler_factory):
            kwargs["total_steps"] = (
                int(self.trainer.estimated_stepping_batches)
                if self.scheduler_interval == "step"
                else int(self.trainer.max_epochs)
            )
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    # ---------------------------------------------------------------------------------------------
    def hparams_for_logging(self) -> dict[str, Any]:
        """The flat dict shown in TensorBoard's HPARAMS tab."""
        return {
            **self.run_info,
            "backbone_weights": getattr(self.net, "weights_source", "?"),
            "num_anchors": self.net.num_anchors,
            "image_size": self.net.image_size,
        }

    def on_fit_start(self) -> None:
        # NHWC convolutions run faster on tensor cores, and bf16 ones on a CPU's AMX units
        # (~1.4x over NCHW bf16); NHWC weights alone make the convolutions NHWC
        if self.device.type == "cuda" or "bf16" in str(self.trainer.precision):
            self.net.to(memory_format=torch.channels_last)
            if self.ema is not None:
                self.ema.net.to(memory_format=torch.channels_last)
        log_hparams_tensorboard(self.trainer, self.hparams_for_logging())

    def on_train_start(self) -> None:
        # after every move of the network (device, memory format), which replaces buffer objects
        saved = set(self.net.state_dict(keep_vars=True))
        groups: dict[torch.dtype, list[Tensor]] = {}
        for name, b in self.net.named_buffers():
            if name in saved:
                groups.setdefault(b.dtype, []).append(b)
        self._state_buffers = list(groups.values())
        self._buffers_before = None
        # a resumed run's average already holds the steps before it (accumulating gradients,
        # the first batches after the resume must not average the restored weights again)
        self._ema_step = self.trainer.global_step

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite()

    def nonfinite_state(self) -> list[str]:
        """The state entries (weights and buffers) of the network and of its moving average
        holding NaN/inf. One host sync."""
        nets = {"": self.net} if self.ema is None else {"": self.net, "ema.": self.ema.net}
        state = {
            f"{prefix}{k}": v
            for prefix, net in nets.items()
            for k, v in net.state_dict().items()
            if v.is_floating_point()
        }
        if not state:
            return []
        finite = torch.stack([torch.isfinite(v).all() for v in state.values()]).tolist()
        return [k for k, ok in zip(state, finite, strict=True) if not ok]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = int(self._nonfinite_total.item())
        # enough to rebuild the network without Hydra (see training.checkpoint)
        checkpoint[CKPT_KEY] = {
            "net_config": dict(self.net.config),
            "ema": self.ema is not None,  # then state_dict["ema.net.*"] is the network to use
            "predict": dict(self.predict_cfg),
            "evaluate": dict(self.eval_cfg),
            "loss": self.criterion.config,
            "nonfinite_total": self.nonfinite_total,
            "class_names": list(self.class_names),
            "metrics": {  # the logged scalars so far (a host sync per save)
                k: float(v)
                for k, v in self.trainer.callback_metrics.items()
                if isinstance(v, Tensor) and v.numel() == 1
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the state dict after this hook: a checkpoint from a run with(out) a
        # moving average continues in one without (with) it (ckpt_path= into another config)
        state = checkpoint.get("state_dict", {})
        has_ema = any(k.startswith(EMA_PREFIX) for k in state)
        if self.ema is not None and not has_ema:
            log.info("the checkpoint has no moving average of the weights: it starts from them")
            n = len(NET_PREFIX)
            state.update(
                {EMA_PREFIX + k[n:]: v for k, v in list(state.items()) if k.startswith(NET_PREFIX)}
            )
        elif self.ema is None and has_ema:
            log.info("model.ema_decay=null: the checkpoint's moving average is left out")
            for k in [k for k in state if k.startswith(EMA_PREFIX)]:
                del state[k]
        self.nonfinite_total = int(checkpoint.get(CKPT_KEY, {}).get("nonfinite_total", 0))
        self.class_names = list(checkpoint.get(CKPT_KEY, {}).get("class_names") or self.class_names)
        self.restored_metrics = dict(checkpoint.get(CKPT_KEY, {}).get("metrics") or {})
        self._nonfinite_total = torch.tensor(float(self.nonfinite_total))
        self._nonfinite_streak = torch.zeros(())
