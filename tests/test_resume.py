"""Resuming a stopped run: exactly where it stopped (kill -9, SIGTERM, SIGINT), in its own dir
(``resume=``) or from a checkpoint (``ckpt_path=``), and the checks before it starts."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from _runs import epoch_scalars, start_training, stop, wait_until
from conftest import make_cfg, run_cli, tiny

from ssd_lightning.config.errors import RunInterrupted
from ssd_lightning.config.job_status import read_job_status
from ssd_lightning.train import train
from ssd_lightning.training.builders import build
from ssd_lightning.training.callbacks import LastCheckpoint

BEST = "ssd_resnet34_best.pt"
EPOCH_TAGS = ("train/loss_epoch", "train/num_pos", "train/accuracy", "train/box_mae")
# 3 epochs of 3 steps; no validation (the best is judged on train/loss, which moves every
# epoch), no figures: only what a resume has to get right
E2E = tiny(
    "data.val_size=0",
    "~callbacks.prediction_images",
    "~callbacks.augmentation_preview",
    trainer__max_epochs=3,
    trainer__limit_train_batches=3,
)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_network(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3 epochs without a stop (subprocess, no workers)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli("ssd_lightning.train", *E2E, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def _stop_in_epoch_1(run: Path, log: Path, overrides: tuple[str, ...], signum: int) -> int:
    """Start a run and send ``signum`` to its process group (workers and DDP ranks included,
    as a scheduler would) once epoch 0 is saved; its exit status."""
    proc = start_training(log, *overrides, f"hydra.run.dir={run}")
    wait_until((run / "checkpoints" / "last.ckpt").is_file, proc, log, timeout=900)
    time.sleep(1.0)  # into epoch 1
    return stop(proc, signum)


def _resume_and_compare(run: Path, straight: Path) -> None:
    """resume=<run>: the final weights of the run never stopped, and from the epoch the stop
    came in, its epoch averages (also of that epoch: a SIGTERM's sums so far travel in
    last.ckpt)."""
    last = run / "checkpoints" / "last.ckpt"
    stopped_at = _state(last)["global_step"]
    assert 3 <= stopped_at < 9
    events_before = set((run / "tensorboard").glob("events.*"))
    r = run_cli("ssd_lightning.train", f"resume={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_network(
        _state(last)["state_dict"], _state(straight / last.relative_to(run))["state_dict"]
    )
    (resumed_events,) = set((run / "tensorboard").glob("events.*")) - events_before
    (straight_events,) = (straight / "tensorboard").glob("events.*")
    got = epoch_scalars(resumed_events, EPOCH_TAGS)
    want = epoch_scalars(straight_events, EPOCH_TAGS)
    for tag in EPOCH_TAGS:
        assert got[tag] == want[tag][stopped_at // 3 :], tag


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGKILL, 0), (signal.SIGKILL, 2), (signal.SIGTERM, 2)],
    ids=["kill-9-no-workers", "kill-9-two-workers", "sigterm-two-workers"],
)
def test_a_stopped_run_resumes_exactly(
    straight_run: Path, tmp_path: Path, signum: int, workers: int
) -> None:
    """Stopped during its second epoch and resumed with resume=<run dir>: the same epochs, the
    same final weights and the same best model as the run that was never stopped (whose
    batches, seeded per sample, do not depend on the number of workers either)."""
    run, log = tmp_path / "run", tmp_path / "stopped.log"
    rc = _stop_in_epoch_1(run, log, (*E2E, f"data.num_workers={workers}"), signum)
    assert rc == (-signal.SIGKILL if signum == signal.SIGKILL else 143), log.read_text()[-3000:]
    _resume_and_compare(run, straight_run)
    # the best of the whole run (also of the epochs before the stop) is the one exported
    best, expected_best = _state(run / BEST), _state(straight_run / BEST)
    assert best["epoch"] == expected_best["epoch"]
    _assert_same_network(best["state_dict"], expected_best["state_dict"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 9
    assert read_job_status(run)["status"] == "COMPLETED"


@pytest.mark.slow
def test_a_ddp_run_stopped_by_sigterm_resumes_exactly(tmp_path: Path) -> None:
    """Two CPU ranks (gloo): SIGTERM to the job's processes during epoch 1, every rank stops at
    the same batch, and resume= ends as the DDP run that was never stopped: the same weights and
    the same epoch averages (the stopped epoch's running sums are those of both ranks)."""
    ddp = (*E2E, "trainer=ddp_cpu")
    straight, run, log = tmp_path / "straight", tmp_path / "run", tmp_path / "stopped.log"
    r = run_cli("ssd_lightning.train", *ddp, f"hydra.run.dir={straight}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _stop_in_epoch_1(run, log, ddp, signal.SIGTERM) == 143, log.read_text()[-3000:]
    # rank 1 got it twice (from the signal to the group, and forwarded by rank 0): with
    # Lightning's own handler, which broadcasts inside the handler, that could hang the run
    assert "[rank 1] received SIGTERM" in (run / "train_ddp_process_1.log").read_text()
    _resume_and_compare(run, straight)


@pytest.mark.slow
def test_a_signal_at_an_epochs_last_batch_resumes_exactly(
    straight_run: Path, tmp_path: Path
) -> None:
    """SIGTERM during the last batch of epoch 0 (Lightning then finishes the epoch, its end and
    its logging, before it stops): the resumed run starts at epoch 1 and ends as the run that
    was never stopped, every epoch logged once with the straight run's values."""
    run = tmp_path / "run"
    at_last_batch = ["+callbacks.signal_at._target_=_runs.SignalAt", "+callbacks.signal_at.step=3"]
    with pytest.raises(RunInterrupted):
        train(make_cfg([*E2E, *at_last_batch], run))
    last = run / "checkpoints" / "last.ckpt"
    assert _state(last)["global_step"] == 3 and _state(last)["epoch"] == 1  # the next to train
    events_before = set((run / "tensorboard").glob("events.*"))

    metrics = train(make_cfg([*E2E, f"resume={run}"], run))
    assert metrics["status"] == "completed" and metrics["global_step"] == 9
    _assert_same_network(
        _state(last)["state_dict"], _state(straight_run / last.relative_to(run))["state_dict"]
    )
    (straight_events,) = (straight_run / "tensorboard").glob("events.*")
    want = epoch_scalars(straight_events, EPOCH_TAGS)
    (stopped_events,) = events_before
    (resumed_events,) = set((run / "tensorboard").glob("events.*")) - events_before
    before, after = (
        epoch_scalars(stopped_events, EPOCH_TAGS),
        epoch_scalars(resumed_events, EPOCH_TAGS),
    )
    for tag in EPOCH_TAGS:
        assert before[tag] + after[tag] == want[tag], tag


@pytest.mark.parametrize(
    "accumulate",
    [
        pytest.param(1, id="step-per-batch"),
        pytest.param(2, id="accumulate-2", marks=pytest.mark.slow),  # ~30 s more
    ],
)
def test_resume_in_place_continues_exactly(tmp_path: Path, accumulate: int) -> None:
    """One epoch, then resume=<run dir> with trainer.max_epochs=2 for the second: what a 2-epoch
    run computes straight (with two workers here, none there: workers draw a resumed epoch's
    indices as soon as Lightning makes the loader's iterator). A constant lr: a longer run
    re-spaces a schedule over its new length (an unchanged length resumes exactly with the
    default schedule too: test_a_stopped_run_resumes_exactly). Validation every 2 epochs: the
    first epoch's state is saved all the same (not only at validations). With accumulated
    gradients the moving average (in the state compared) is not updated again after a resume."""
    straight_dir, run = tmp_path / "straight", tmp_path / "run"
    every2 = (
        "scheduler=none",
        "trainer.check_val_every_n_epoch=2",
        f"trainer.accumulate_grad_batches={accumulate}",
    )
    straight = train(make_cfg(tiny(*every2, trainer__max_epochs=2), straight_dir))
    train(make_cfg(tiny(*every2, trainer__max_epochs=1, data__num_workers=2), run))
    metrics = train(
        make_cfg(tiny(*every2, f"resume={run}", trainer__max_epochs=2, data__num_workers=2), run)
    )
    assert metrics["global_step"] == straight["global_step"] == 4 // accumulate
    for k in ("train/loss", "train/num_pos", "val/loss"):
        assert metrics[k] == pytest.approx(straight[k], rel=1e-4), k
    got = _state(run / "checkpoints" / "last.ckpt")["state_dict"]
    want = _state(straight_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("ema.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    ("signum", "workers"),
    [
        pytest.param(signal.SIGTERM, 2, id="sigterm-two-workers"),
        pytest.param(signal.SIGINT, 0, id="sigint-no-workers", marks=pytest.mark.slow),
    ],
)
def test_a_signal_saves_records_and_exits_nonzero(
    tmp_path: Path, signum: int, workers: int
) -> None:
    """A cluster's time limit (SIGTERM to the job's processes) or Ctrl-C: the run stops after its
    batch, saves last.ckpt, records INTERRUPTED (job_status.json, metrics.json with the state
    reached), exits 128 + the signal; resume=<run dir> then finishes it."""
    run, log = tmp_path / "run", tmp_path / "stopped.log"
    overrides = tiny(
        "logger=none",
        "~callbacks.prediction_images",
        "~callbacks.augmentation_preview",
        f"data.num_workers={workers}",
        trainer__max_epochs=3,
        test_after_fit="true",
        data__val_size=4,  # what test_after_fit evaluates once the resumed run completes
    )
    proc = start_training(log, *overrides, f"hydra.run.dir={run}")
    last = run / "checkpoints" / "last.ckpt"
    wait_until(last.is_file, proc, log, timeout=900)
    rc = stop(proc, signum)
    assert rc == 128 + signum, log.read_text()[-3000:]
    assert f"Interrupted: {signal.Signals(signum).name} at epoch" in log.read_text()
    status = read_job_status(run)
    assert status["status"] == "INTERRUPTED" and f"resume={run}" in status["error"]
    metrics = json.loads((run / "metrics.json").read_text())
    saved = _state(last)
    assert metrics["status"] == "interrupted"
    assert metrics["global_step"] == saved["global_step"] >= 2  # the state reached is saved
    assert "test_after_fit: skipped, the run is interrupted" in log.read_text()
    assert not (run / "eval_metrics.json").exists()

    r = run_cli("ssd_lightning.train", f"resume={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 6
    assert read_job_status(run)["status"] == "COMPLETED"


class _LastCheckpointEpochs(L.Callback):
    """The epoch stored in last.ckpt when each training epoch after the first starts."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.seen.append(_state(self.path)["epoch"])


@pytest.mark.parametrize(("interval", "seen"), [(0, [0, 1, 2]), (1e6, [0, 0, 0])])
def test_last_checkpoint_is_rewritten_at_most_every_min_interval(
    tmp_path: Path, interval: float, seen: list[int]
) -> None:
    """last.ckpt after the first epoch, then only once min_interval_s has passed since the last
    write, and always after the last epoch (a write costs as much as a GPU epoch)."""
    cfg = make_cfg(
        tiny(
            "data.val_size=0",
            "~callbacks.prediction_images",
            "~callbacks.augmentation_preview",
            trainer__max_epochs=4,
            trainer__limit_train_batches=1,
            callbacks__last_checkpoint__min_interval_s=interval,
        ),
        tmp_path / "run",
    )
    spy = _LastCheckpointEpochs(tmp_path / "run" / "checkpoints" / "last.ckpt")
    module, datamodule, trainer = build(cfg, extra_callbacks=[spy])
    trainer.fit(module, datamodule=datamodule)
    assert spy.seen == seen
    assert _state(spy.path)["epoch"] == 3  # the last epoch is always written


def test_last_checkpoint_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="min_interval_s=-1.*numbers >= 0"):
        LastCheckpoint("unused", min_interval_s=-1)


def test_resuming_a_finished_run_keeps_its_metrics(tmp_path: Path) -> None:
    """resume= of a run that already reached trainer.max_epochs trains nothing more; its
    metrics.json still holds the run's final metrics (they come from the checkpoint when no epoch
    logged them in this process: also the last validation's, in a run that validates every n
    epochs and was resumed after it)."""
    run = tmp_path / "run"
    first = train(make_cfg(tiny(), run))
    again = train(make_cfg(tiny(f"resume={run}"), run))
    assert again["status"] == "completed" and again["global_step"] == first["global_step"]
    for k in ("train/loss", "val/map", "val/loss"):
        assert again[k] == first[k], k
    assert json.loads((run / "metrics.json").read_text())["val/map"] == first["val/map"]
