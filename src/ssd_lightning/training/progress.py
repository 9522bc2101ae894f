"""Progress of a fit: a bar on a terminal, one readable line per epoch in the run's log.

On a terminal the bar reads ``Epoch 3/100`` and shows the whole run's ETA beside the metrics
(``RunProgress``). Each epoch also ends with one line (``EpochLog``), e.g.
``epoch 3/100  train/loss 2.314  val/loss 2.871  val/map_50 0.412  17.2 s/epoch  ETA 27m53s``:
on the console where no bar draws (a log file, a cluster job, ``enable_progress_bar=false``:
the carriage-return redraws of a bar would fill such a log with noise), and in the run's log
file always. An epoch without a validation shows the last one's numbers, with its epoch.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from ssd_lightning.config.cli import log_to_files

log = logging.getLogger(__name__)

# the metrics of the per-epoch line, in this order, when the run logs them
LINE_METRICS = ("train/loss_epoch", "val/loss", "val/map_50", "val/map")


def format_duration(seconds: float) -> str:
    """1234.5 -> '20m34s', 45.2 -> '45s', 7384 -> '2h03m'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class RunProgress(TQDMProgressBar):
    """TQDMProgressBar with the epoch count and the run's ETA; off on a non-terminal (where
    ``EpochLog``'s lines tell the progress). ``refresh_rate`` as TQDMProgressBar's (reading the
    logged values for the bar is a host-device sync: not every step)."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        # Lightning's bar writes to stdout: `train > log.txt` from a terminal wants the lines
        self.interactive = sys.stdout.isatty()
        if not self.interactive:
            self.disable()
        self.clock = RunClock()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.clock.start(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if self.interactive and self.train_progress_bar is not None:
            self.train_progress_bar.set_description(f"Epoch {epoch_text(trainer)}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        batches = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        fraction = done / batches if batches and batches != float("inf") else 0.0
        _, left = self.clock.eta(trainer, trainer.current_epoch + fraction)
        if left is not None:
            metrics["run_eta"] = format_duration(left)
        return metrics


class EpochLog(Callback):
    """One line per epoch: on the console where no bar draws, in the run's log file always."""

    def __init__(self) -> None:
        self.clock = RunClock()
        self.val_epoch: int | None = None  # the epoch of the last validation

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.start(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = trainer.callback_metrics  # every rank: it reduces metrics logged with sync_dist
        if not trainer.is_global_zero:
            return
        parts = [f"epoch {epoch_text(trainer)}"]
        parts += [
            f"{k.removesuffix('_epoch')} {float(values[k]):.4g}"
            for k in LINE_METRICS
            if k in values
        ]
        if self.val_epoch is not None and self.val_epoch != trainer.current_epoch:
            parts.append(f"(val of epoch {self.val_epoch + 1})")
        per_epoch, left = self.clock.eta(trainer, trainer.current_epoch + 1)
        if per_epoch is not None:
            parts.append(f"{per_epoch:.1f} s/epoch  ETA {format_duration(left)}")
        line = "  ".join(parts)
        bar = trainer.progress_bar_callback
        if isinstance(bar, RunProgress) and bar.interactive:
            log_to_files(line, log, logging.INFO)  # the console has the bar
        else:
            log.info(line)


class RunClock:
    """The whole run's pace: seconds per epoch and the ETA, from the epochs of this process (a
    resumed run starts later)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.epochs_at_start = 0

    def start(self, trainer: L.Trainer) -> None:
        self.started, self.epochs_at_start = time.monotonic(), trainer.current_epoch

    def eta(self, trainer: L.Trainer, epochs_done: float) -> tuple[float | None, float | None]:
        """(seconds per epoch, seconds left), None while unknown."""
        done = epochs_done - self.epochs_at_start
        if self.started is None or done <= 0 or not trainer.max_epochs or trainer.max_epochs < 0:
            return None, None
        per_epoch = (time.monotonic() - self.started) / done
        return per_epoch, per_epoch * max(0.0, trainer.max_epochs - epochs_done)


def epoch_text(trainer: L.Trainer) -> str:
    total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
    return f"{trainer.current_epoch + 1}/{total}"
