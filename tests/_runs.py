"""Training runs in a subprocess, for the tests that stop them with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from conftest import ROOT
from tensorboard.backend.event_processing import event_accumulator as ea


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_LIGHTNING_")}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def start_training(
    log: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m ssd_lightning.train <overrides>`` in its own process group (so a signal can
    reach its DataLoader workers too, as a scheduler's would); output into ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ssd_lightning.train", *overrides],
            cwd=ROOT,
            env=env or cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(done: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``done`` while ``proc`` runs; fail with the log's tail if it ends or times out."""
    end = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(
                f"run ended or timed out (rc {proc.poll()}):\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.2)


def stop(proc: subprocess.Popen, signum: int, timeout: float = 300) -> int:
    """Send ``signum`` to the run's process group; its exit status."""
    os.killpg(proc.pid, signum)
    return proc.wait(timeout=timeout)


def epoch_scalars(event_file: Path, tags: tuple[str, ...]) -> dict[str, list[float]]:
    """Per tag, the values of one event file in step order."""
    acc = ea.EventAccumulator(str(event_file), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {t: [e.value for e in sorted(acc.Scalars(t), key=lambda e: e.step)] for t in tags}


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (1-based: the
    global step reached), for a stop at a chosen batch; once per process."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
