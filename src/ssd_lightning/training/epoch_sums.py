"""The running sums behind a training epoch's logged averages, carried across a mid-epoch stop.

Lightning averages what ``training_step`` logs with ``on_epoch=True`` over the epoch's batches,
but does not save those running sums in a checkpoint. A run stopped by a signal in the middle of
an epoch (see ``LastCheckpoint``) would then report, for that epoch after ``resume=``, averages
over the remaining batches only. ``epoch_sums`` reads the sums when the stop is saved and
``fold_in`` adds them back once the resumed epoch has logged again, so the epoch's averages are
those of the run that was never stopped (float addition commutes: the same bits).

Both read Lightning's result collection (``trainer._results``, a private attribute: the tests of
the exact resume guard it).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

CKPT_KEY = "ssd_lightning_epoch_sums"
_FX = "training_step."  # the result keys of what training_step logs: "training_step.<name>"


def _epoch_metrics(trainer: L.Trainer) -> dict[str, Any]:
    results = trainer._results
    if results is None:
        return {}
    return {
        key: metric
        for key, metric in results.items()
        if key.startswith(_FX)
        and metric.is_tensor
        and metric.meta.on_epoch
        and (metric.meta.is_mean_reduction or metric.meta.is_sum_reduction)
    }


def epoch_sums(trainer: L.Trainer) -> dict[str, dict[str, Tensor]]:
    """``{key: {"value": (), "count": ()}}``: the current training epoch's sums (weighted by batch
    size for the averages) and batch-size totals, summed over all ranks (a collective: every rank
    calls it at the same batch)."""
    sums = {}
    for key, metric in sorted(_epoch_metrics(trainer).items()):
        value = trainer.strategy.reduce(metric.value.clone(), reduce_op="sum")
        entry = {"value": value.detach().cpu()}
        if metric.meta.is_mean_reduction:
            count = trainer.strategy.reduce(metric.cumulated_batch_size.clone(), reduce_op="sum")
            entry["count"] = count.detach().cpu()
        sums[key] = entry
    return sums


def fold_in(trainer: L.Trainer, sums: dict[str, dict[str, Tensor]]) -> None:
    """Add the saved sums to the resumed epoch's, for each key it has logged by now; those folded
    in are removed from ``sums``. Rank 0 alone adds them: ``sums`` already holds every rank's,
    and the epoch's average adds the ranks up."""
    metrics = _epoch_metrics(trainer)
    for key in [k for k in sums if k in metrics]:
        entry, metric = sums.pop(key), metrics[key]
        if trainer.global_rank != 0:
            continue
        metric.value = metric.value + entry["value"].to(metric.value)
        if "count" in entry:
            count = entry["count"].to(metric.cumulated_batch_size)
            metric.cumulated_batch_size = metric.cumulated_batch_size + count


def restored(checkpoint: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The sums a checkpoint holds (none unless a signal stopped its run mid-epoch)."""
    return {
        key: {name: torch.as_tensor(v) for name, v in entry.items()}
        for key, entry in (checkpoint.get(CKPT_KEY) or {}).items()
    }
