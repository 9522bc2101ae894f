"""DataLoader workers survive a stop signal at any moment, also while they start."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from ssd_lightning.data.sampling import seed_worker
from ssd_lightning.data.workers import ShieldedForkContext, worker_context

pytestmark = pytest.mark.skipif(
    worker_context(2) is None, reason="the shield needs the fork start method (Linux)"
)


def _signal_self_then_seed(worker_id: int) -> None:
    # SIGTERM from another process (as a scheduler's, to the whole group) reaching the worker
    # after torch installed its handler and before seed_worker could ignore it
    os.kill(os.getpid(), signal.SIGTERM)
    seed_worker(worker_id)


def _loader(context: multiprocessing.context.BaseContext) -> DataLoader:
    return DataLoader(
        range(8),
        batch_size=2,
        num_workers=2,
        worker_init_fn=_signal_self_then_seed,
        multiprocessing_context=context,
    )


def test_a_stop_signal_while_a_worker_starts_kills_no_worker() -> None:
    batches = [b.tolist() for b in _loader(worker_context(2))]
    assert batches == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_without_the_shield_the_worker_dies() -> None:
    """Why the shield exists: torch's worker SIGTERM handler kills the worker."""
    with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
        list(_loader(multiprocessing.get_context("fork")))


def test_the_datamodule_uses_it(compose_cfg) -> None:
    cfg = compose_cfg(["data.num_workers=2", "data.preload=false"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().multiprocessing_context, ShieldedForkContext)
    assert isinstance(dm.val_dataloader().multiprocessing_context, ShieldedForkContext)
