"""SIGTERM (a scheduler's time limit) and SIGINT (Ctrl-C) stop a run at the end of a training
batch, on every DDP rank at the same one; ``LastCheckpoint`` then saves the state reached.

``stop_on_signals`` wraps the fit: a signal asks Lightning to stop (its SIGTERM handling), a
second Ctrl-C aborts. ``StopTogether`` makes that stop safe under DDP. Lightning's own SIGTERM
handler runs a broadcast inside the handler and forwards the signal to the ranks it launched; a
rank that gets the signal twice (a scheduler signals every process of the job, and rank 0
forwards it again) then runs one broadcast more than rank 0, and the run hangs. With
``StopTogether`` a signal only marks the rank; at the end of each training batch the ranks
all-reduce their marks and all set Lightning's stop flag at once, so its checks stop every rank
at the same batch.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """During the fit, SIGTERM and SIGINT stop the run at the end of the current training batch
    (Lightning's SIGTERM handling, after which ``LastCheckpoint`` saves last.ckpt). A second
    SIGINT aborts at once. Yields the signals received, in order."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals need the main thread
        yield received
        return
    _RECEIVED.append(received)

    def on_sigterm(signum: int, frame: Any) -> None:  # Lightning calls this after its own
        received.append(signum)

    def on_sigint(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("SIGINT: stopping after this batch, saving the state (Ctrl-C again: abort)")
        signal.raise_signal(signal.SIGTERM)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        _RECEIVED.remove(received)
        for s, handler in previous.items():
            signal.signal(s, handler)


# the signals of the fits under way (``stop_on_signals``): one that came before Lightning took
# over the signal handling (while the data loads or the checkpoint restores) is applied when
# training starts (``StopTogether.on_train_start``)
_RECEIVED: list[list[int]] = []


class StopTogether(L.Callback):
    """Under DDP (world size > 1): every rank stops at the same training batch after a SIGTERM,
    whichever ranks received it and however often (see the module's docstring). One all-reduce
    of one number per training batch, under DDP only; a single process keeps Lightning's
    handling as it is."""

    def __init__(self) -> None:
        self._marked = False
        self._active = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a signal before Lightning's handler was installed (setup, preload, restore) only reached
        # stop_on_signals' record: stop at the first batch, as Lightning would have
        if any(_RECEIVED):
            trainer._signal_connector.received_sigterm = True
        # Lightning installs its handler when the fit starts, before this hook
        self._marked = False
        self._active = (
            trainer.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
            and threading.current_thread() is threading.main_thread()
        )
        if not self._active:
            return
        connector = trainer._signal_connector  # private: the tests of the DDP stop guard it
        current = signal.getsignal(signal.SIGTERM)
        others = [
            h
            for h in getattr(current, "signal_handlers", [current])
            if h != connector._sigterm_notifier_fn and callable(h)
        ]
        launcher = getattr(trainer.strategy, "launcher", None)

        def on_sigterm(signum: int, frame: Any) -> None:
            log.info("[rank %d] received %s", trainer.global_rank, signal.Signals(signum).name)
            if not self._marked and launcher is not None:
                launcher.kill(signum)  # the ranks this one launched: a `kill <pid>` reaches all
            self._marked = True
            for handler in others:  # e.g. stop_on_signals' record, SLURM's requeue
                handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not self._active:
            return
        marked = torch.tensor([int(self._marked)], device=pl_module.device)
        dist.all_reduce(marked, op=dist.ReduceOp.MAX)
        if marked.item():
            trainer._signal_connector.received_sigterm = True  # Lightning's checks stop here
