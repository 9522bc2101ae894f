"""What keeps a run's files trustworthy: atomic writes, weights-only resume, the checks before a
resume, no silent reuse of a run dir, disk use, and no silent end with broken weights."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _runs import cli_env
from conftest import ROOT, make_cfg, run_cli, tiny

from ssd_lightning.config.errors import ConfigError, RunInterrupted
from ssd_lightning.config.job_status import read_job_status
from ssd_lightning.config.paths import load_option
from ssd_lightning.data.pennfudan_datamodule import PennFudanDataModule
from ssd_lightning.train import train
from ssd_lightning.training.checkpoint import (
    CheckpointError,
    architecture_differences,
    read_checkpoint,
)
from ssd_lightning.training.checkpoint_io import RunCheckpointIO
from ssd_lightning.training.csv_log import ResumableCSVLogger
from ssd_lightning.training.resume import refuse_existing_run_dir, resume_argv, start_checkpoint

BEST = "ssd_resnet34_best.pt"

# A child that builds the run's Trainer from the config and saves a ~200 MB checkpoint through
# it again and again, each version a constant tensor; "saved" once the first one is complete.
_SAVER = """
import sys, torch
sys.path.insert(0, "tests")
from conftest import make_cfg, tiny
from ssd_lightning.training.builders import build
_, _, trainer = build(make_cfg(tiny("logger=none"), sys.argv[2]))
io, path, v = trainer.strategy.checkpoint_io, sys.argv[1], 0
while True:
    io.save_checkpoint({"version": v, "w": torch.full((50_000_000,), float(v))}, path)
    if v == 0:
        print("saved", flush=True)
    v += 1
"""


def _other_filesystem(path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(path).st_dev:
        return shm
    return None


@pytest.mark.parametrize("tmpdir", ["same", "other"], ids=["tmpdir-same-fs", "tmpdir-other-fs"])
def test_a_kill_during_a_checkpoint_save_keeps_the_old_one(tmp_path: Path, tmpdir: str) -> None:
    """SIGKILL while last.ckpt is being rewritten: the previous last.ckpt stays whole (with
    $TMPDIR on the checkpoint's filesystem and on another one)."""
    where = tmp_path if tmpdir == "same" else _other_filesystem(tmp_path)
    if where is None:
        pytest.skip("no second filesystem (/dev/shm) on this machine")
    scratch = Path(where) / f"tmpdir-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(last), str(tmp_path / "run")],
        cwd=ROOT,
        env=cli_env(TMPDIR=str(scratch)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "saved"
        full = last.stat().st_size
        deadline = time.monotonic() + 60
        # kill while a new version is being written: last.ckpt shrunk (a copy into it) or a
        # temporary file next to it
        while time.monotonic() < deadline:
            writing = last.stat().st_size < full or any(last.parent.glob(".last.ckpt.*"))
            if writing:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    blob = torch.load(last, map_location="cpu", weights_only=True)
    assert torch.equal(blob["w"], torch.full((50_000_000,), float(blob["version"])))


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_malicious_checkpoint_runs_nothing(tmp_path: Path, monkeypatch) -> None:
    """Even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (and on torch < 2.6) a resume loads
    checkpoints weights-only: the payload is refused, with one message."""
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Payload(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="cannot read it"):
        RunCheckpointIO().load_checkpoint(evil)  # what Lightning calls to resume
    assert not marker.exists()
    r = subprocess.run(
        [sys.executable, "-m", "ssd_lightning.train", *tiny(f"ckpt_path={evil}")],
        cwd=ROOT,
        env=cli_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"ckpt_path={evil}: cannot read it as a PyTorch checkpoint" in r.stderr
    assert not marker.exists()
    # the test means something: a default load would have run the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (["anchors=ssd"], "anchors.ratios"),  # the same head shapes: would resume silently
        (["anchors=dense_tall"], "anchors.ratios"),  # other head shapes: was a traceback
        (["model.net.head_kernel_size=3"], "model.net.head_kernel_size"),
    ],
)
def test_resume_with_another_network_is_refused(
    tiny_run: dict, tmp_path: Path, changes: list, key: str
) -> None:
    last = tiny_run["dir"] / "checkpoints" / "last.ckpt"
    cfg = make_cfg(tiny(f"ckpt_path={last}", *changes), tmp_path / "run")
    with pytest.raises(
        CheckpointError, match=rf"network is not the one[\s\S]*{key}: checkpoint"
    ) as e:
        train(cfg)
    if changes[0].startswith("anchors="):  # e.g. a default changed since the run: give it again
        assert "give its value again: anchors=pennfudan_fitted" in str(e.value)


def test_a_preset_that_gained_a_key_still_resumes() -> None:
    """The anchors are compared by what they make: a run made before the default preset
    recorded the preset it was fitted from (fitted_from, extra_square) has the same network."""
    preset = dict(load_option("anchors", "pennfudan_fitted"))
    older = {k: v for k, v in preset.items() if k not in ("fitted_from", "extra_square")}
    net = {"image_size": 300, "num_classes": 2}
    assert architecture_differences({**net, "anchors": older}, {**net, "anchors": preset}) == []
    other = {**older, "clip": False}
    assert architecture_differences({**net, "anchors": other}, {**net, "anchors": preset}) == [
        "anchors.clip: checkpoint False, config True"
    ]


def test_resume_from_a_broken_checkpoint_is_one_message(tiny_run: dict, tmp_path: Path) -> None:
    truncated = tmp_path / "last.ckpt"
    data = (tiny_run["dir"] / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    r = run_cli("ssd_lightning.train", *tiny(f"ckpt_path={truncated}", "anchors=dense_tall"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"ckpt_path={truncated}: cannot read it as a PyTorch checkpoint" in r.stderr


def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A photo, an empty file or an exported .onnx given as ckpt_path: one message saying what
    the file is, never torch's advice to load it without weights_only."""
    photo = ROOT / "data" / "PennFudanPed" / "PNGImages" / "FudanPed00001.png"
    empty = tmp_path / "model.pt"
    empty.touch()
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch")  # the start of an ONNX protobuf
    for path, what in (
        (photo, "not a file torch.save writes)"),
        (empty, "not a file torch.save writes; it is empty"),
        (onnx, "an ONNX model; give the .ckpt or exported .pt"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(what)) as e:
            read_checkpoint(path)
        assert "weights_only" not in str(e.value)
    evil = tmp_path / "evil.pt"
    torch.save({"payload": _Payload(tmp_path / "ran")}, evil)
    with pytest.raises(CheckpointError, match="refused by the weights-only load: Unsupported") as e:
        read_checkpoint(evil)
    assert "allowlist" not in str(e.value) and not (tmp_path / "ran").exists()
    torch.save({"payload": _System()}, evil)  # a module torch blocks outright (os.system)
    with pytest.raises(CheckpointError, match="refused by the weights-only load: .*GLOBAL") as e:
        read_checkpoint(evil)
    assert "weights_only" not in str(e.value)
    r = run_cli("ssd_lightning.evaluate", f"ckpt_path={onnx}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"ckpt_path={onnx}: an ONNX model" in r.stderr


def _fake_run(run: Path) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a previous run's state")
    (run / "metrics.json").write_text("{}")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- anchors=ssd\n")


def test_an_existing_run_dir_is_not_reused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(run)
    r = run_cli("ssd_lightning.train", *tiny(), f"hydra.run.dir={run}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "already holds a run (checkpoints/last.ckpt, metrics.json)" in r.stderr
    assert f"resume={run}" in r.stderr and "overwrite=true" in r.stderr
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- anchors=ssd\n"  # untouched
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"a previous run's state"
    # the same check inside the task (e.g. a run composed in-process)
    with pytest.raises(ConfigError, match="already holds a run"):
        start_checkpoint(make_cfg(tiny(), run), run)
    # overwrite=true: start over there, without the previous run's files
    (run / "eval_metrics.json").write_text("{}")  # its test_after_fit
    for logs in ("tensorboard", "csv"):  # its curves would mix with the new run's
        (run / logs).mkdir()
        (run / logs / "old").write_text("x")
    (run / "notes.txt").write_text("mine")
    assert start_checkpoint(make_cfg(tiny("overwrite=true", "logger=many"), run), run) is None
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()
    assert not (run / "eval_metrics.json").exists()
    assert not (run / "tensorboard").exists() and not (run / "csv").exists()
    assert (run / "notes.txt").read_text() == "mine"  # not a run's output: kept


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(run)  # its last.ckpt is not a checkpoint
    r = run_cli("ssd_lightning.train", f"resume={run}", "data.num_workers=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot read it as a PyTorch checkpoint" in r.stderr
    # Hydra rewrote .hydra/ before the task refused: put back, so resume= replays the run's own
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- anchors=ssd\n"
    status = read_job_status(run)
    assert status["status"] == "FAILED" and "cannot read it" in status["error"]
    # ckpt_path= of another run into this one: refused before Hydra writes there
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x")
    r = run_cli("ssd_lightning.train", f"ckpt_path={other}", f"hydra.run.dir={run}")
    assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr[-3000:]
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- anchors=ssd\n"


def test_disk_use_full_state_only_in_last_ckpt(tiny_run: dict) -> None:
    run: Path = tiny_run["dir"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(run / BEST, map_location="cpu", weights_only=True)
    assert last["optimizer_states"] and "optimizer_states" not in best
    # weights only: about a third of the full state (Adam keeps two moments per weight)
    assert (run / BEST).stat().st_size < 0.4 * (run / "checkpoints" / "last.ckpt").stat().st_size


def _nan_resnet34(path: Path) -> Path:
    from torchvision.models import resnet34

    state = resnet34().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)
    return path


def test_a_run_ending_with_nonfinite_weights_fails(tmp_path: Path) -> None:
    """Every step is skipped (NaN activations), so the run would end "well" with NaN weights:
    it fails instead, with one message, a failed status, and no exported model."""
    run = tmp_path / "run"
    weights = _nan_resnet34(tmp_path / "nan_resnet34.pt")
    r = run_cli(
        "ssd_lightning.train",
        *tiny("logger=none", f"model.net.weights={weights}", test_after_fit="true"),
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Run failed: the run ended with non-finite weights" in r.stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert read_job_status(run)["status"] == "FAILED"
    assert not (run / BEST).exists()
    assert "test_after_fit: skipped, the run is failed" in r.stdout + r.stderr
    assert not (run / "eval_metrics.json").exists()


def test_summarize_marks_interrupted_jobs(tmp_path: Path) -> None:
    from ssd_lightning.config.job_status import write_job_status
    from ssd_lightning.tools.summarize import INTERRUPTED, OK, find_jobs, sort_jobs

    for job, status, value in (("0", "INTERRUPTED", 0.9), ("1", "COMPLETED", 0.5)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (tmp_path / job / "metrics.json").write_text(json.dumps({"val/map_50": value}))
        write_job_status(tmp_path / job, status, "SIGTERM at epoch 3, step 30; continue ...")
    jobs = sort_jobs(find_jobs(tmp_path), "val/map_50")
    assert [(j.name, j.status) for j in jobs] == [("1", OK), ("0", INTERRUPTED)]
    assert jobs[1].note.startswith("SIGTERM at epoch 3")


def test_a_file_that_is_no_checkpoint_is_not_blamed_on_mmap(tmp_path: Path) -> None:
    """The resume check reads with mmap, which only zip archives allow: a text file saved as
    last.ckpt is reported as unreadable, not as something to re-save with a torch.save option."""
    garbage = tmp_path / "last.ckpt"
    garbage.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot read it as a PyTorch checkpoint") as e:
        read_checkpoint(garbage, key="resume", mmap=True)
    assert "mmap" not in str(e.value) and "\n" not in str(e.value)


def test_a_signal_while_the_data_loads_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before the fit's training starts (data preload, checkpoint restore) Lightning's handler is
    # not installed yet: the signal must still stop the run, not be recorded and forgotten
    setup = PennFudanDataModule.setup

    def signalled_setup(self, stage=None):
        signal.raise_signal(signal.SIGTERM)
        return setup(self, stage)

    monkeypatch.setattr(PennFudanDataModule, "setup", signalled_setup)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="SIGTERM at epoch 0, step 1; continue the run with"):
        train(make_cfg(tiny(trainer__max_epochs=3, data__preload="false"), run))
    assert read_job_status(run)["status"] == "INTERRUPTED"
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_run_started_from_a_checkpoint_resumes_from_its_own(tmp_path: Path) -> None:
    # `train ckpt_path=A/last.ckpt` into B, stopped: `resume=B` continues from B's last.ckpt;
    # replaying ckpt_path= would refuse the pair ("give one of them")
    run = tmp_path / "B"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- ckpt_path=/runs/A/last.ckpt\n- anchors=ssd\n")
    argv = resume_argv(["train", f"resume={run}"])
    assert argv == [
        "train",
        "anchors=ssd",
        f"resume={run.resolve()}",
        f'hydra.run.dir="{run.resolve()}"',
    ]


def test_a_run_dir_named_through_the_environment_is_guarded_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the README's SLURM form: hydra.run.dir=outputs/${oc.env:SLURM_JOB_ID}
    run = tmp_path / "1234"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    monkeypatch.setenv("JOB", "1234")
    for given in (f"hydra.run.dir={tmp_path}/${{oc.env:JOB}}", f"++hydra.run.dir={run}"):
        with pytest.raises(ConfigError, match=f"hydra.run.dir={run} already holds a run"):
            refuse_existing_run_dir(["train", given])
    refuse_existing_run_dir(["train", f"hydra.run.dir={tmp_path}/${{oc.env:NO_SUCH_VAR}}"])
    refuse_existing_run_dir(["train", f"hydra.run.dir={tmp_path}/${{now:%H}}"])  # Hydra's own


def test_a_resumed_run_keeps_its_csv_log(tmp_path: Path) -> None:
    # Lightning's CSVLogger deletes metrics.csv when a writer starts in its dir (the resume)
    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"train/loss": 2.0, "lr-AdamW": 1e-3}, step=0)
    first.save()
    resumed = ResumableCSVLogger(tmp_path, name="csv", version="")
    resumed.log_metrics({"train/loss": 1.5, "val/map": 0.25}, step=1)  # one column fewer, one new
    resumed.save()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert [r["train/loss"] for r in rows] == ["2.0", "1.5"]
    assert rows[0]["lr-AdamW"] == "0.001" and rows[1]["val/map"] == "0.25"
