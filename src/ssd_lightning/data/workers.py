"""DataLoader workers that a stop signal cannot kill.

A cluster's time limit or Ctrl-C signals the whole process group. The main process then finishes
its batch, saves and shuts the workers down; a worker must not die of the signal first, or the
main process fails with "DataLoader worker exited unexpectedly" instead of saving. torch installs
its own SIGTERM handler in a new worker (one that kills the worker) before the worker_init_fn can
ignore the signal, and a signal in that window would kill it: so workers start with SIGINT and
SIGTERM blocked, and ``ignore_stop_signals`` ignores, then unblocks them.

The price: multiprocessing ends a daemon process at exit with SIGTERM, then waits for it. Workers
that a failed or stopped fit leaves running (a data error, a signal during validation) would
ignore that and the process would wait forever, so at exit such workers are killed first.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.context
import signal

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _ShieldedForkProcess(multiprocessing.context.ForkProcess):
    def start(self) -> None:
        # the child inherits the signal mask at fork; the parent gets any signal right after
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        _kill_leftovers_at_exit()


class ShieldedForkContext(multiprocessing.context.ForkContext):
    """The fork start method, with SIGINT / SIGTERM blocked in new processes."""

    Process = _ShieldedForkProcess


def _kill_leftover_workers() -> None:
    leftovers = [
        p for p in multiprocessing.active_children() if isinstance(p, _ShieldedForkProcess)
    ]
    if not leftovers:
        return
    # torch's SIGCHLD handler raises when a worker dies of a signal: these deaths are wanted
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in leftovers:
        p.kill()
    for p in leftovers:
        p.join(timeout=10)


@functools.cache
def _kill_leftovers_at_exit() -> None:
    # registered once a worker has started: after multiprocessing's own exit handler (which its
    # util module registers when imported, at the latest by starting a process), so that it runs
    # first (atexit runs the last registered first)
    atexit.register(_kill_leftover_workers)


def worker_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """The DataLoader's ``multiprocessing_context``: shielded fork where fork is the start method
    (Linux), else None (the platform's default; the window stays open there)."""
    if num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return None
    # the start method set by the user, else the platform's default (the first listed); asking
    # get_context() instead would fix the start method as a side effect
    method = multiprocessing.get_start_method(allow_none=True)
    if (method or multiprocessing.get_all_start_methods()[0]) != "fork":
        return None
    return ShieldedForkContext()


def ignore_stop_signals() -> None:
    """In a worker: ignore SIGINT / SIGTERM, then let them through (a pending one is dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
