"""What a user reads: one line per epoch in a log, DEBUG presets that debug this package and not
every library, errors printed once, --help for every tool, outputs where the user expects them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PENNFUDAN, one_error_line, run_cli, tiny

from ssd_lightning.training.progress import EpochLog, RunProgress, format_duration


def test_a_logged_run_has_one_line_per_epoch(tmp_path: Path) -> None:
    r = run_cli(
        "ssd_lightning.train",
        # no bar (as in TINY): the lines are the log's progress all the same
        *tiny(trainer__max_epochs=3, trainer__check_val_every_n_epoch=2),
        "extras.print_config=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    # extras.print_config: the resolved tree once, at the start, the file it is saved in named
    tree = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert f"config ({tmp_path / 'run' / 'config_resolved.yaml'}):\n{tree}" in out
    assert "  _target_: ssd_lightning.training.lit_module.SSDLitModule" in tree
    assert out.index("config (") < out.index("epoch 1/3")
    assert "\r" not in out  # no bar redraws in a file
    lines = [ln for ln in out.splitlines() if "][ssd_lightning.training.progress][" in ln]
    assert [ln.split(" - ")[1].split("  ")[0] for ln in lines] == [
        f"epoch {i}/3" for i in (1, 2, 3)
    ]
    assert "val/" not in lines[0] and "ETA" in lines[0]  # no validation yet
    assert "val/map_50" in lines[1] and "(val of epoch" not in lines[1]
    assert "val/map_50" in lines[2] and "(val of epoch 2)" in lines[2]  # the last one's, named
    assert "litlogger" not in out
    log = (tmp_path / "run" / "train.log").read_text()
    assert "epoch 3/3" in log


@pytest.mark.parametrize(("stdout_tty", "stderr_tty"), [(False, True), (True, False)])
def test_the_bar_is_drawn_only_where_it_goes_to_a_terminal(
    monkeypatch: pytest.MonkeyPatch, stdout_tty: bool, stderr_tty: bool
) -> None:
    # Lightning's bar writes to stdout: `train > log.txt` from a terminal (stderr still a tty)
    # must get the per-epoch lines, not carriage-return redraws in the file
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_tty)
    bar = RunProgress()
    assert bar.interactive is stdout_tty and bar.is_disabled is not stdout_tty


@pytest.mark.parametrize("terminal", [True, False])
def test_the_epoch_line_goes_to_the_console_only_where_no_bar_draws(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path, terminal
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    trainer = SimpleNamespace(
        is_global_zero=True,
        callback_metrics={"train/loss_epoch": torch.tensor(2.5)},
        current_epoch=0,
        max_epochs=3,
        progress_bar_callback=RunProgress(),
    )
    run_log = logging.FileHandler(tmp_path / "train.log")  # the run's log file, as Hydra's
    logging.getLogger().addHandler(run_log)
    try:
        with caplog.at_level(logging.INFO, logger="ssd_lightning.training.progress"):
            EpochLog().on_train_epoch_end(trainer, None)
    finally:
        logging.getLogger().removeHandler(run_log)
        run_log.close()
    assert "epoch 1/3  train/loss 2.5" in (tmp_path / "train.log").read_text()
    assert ("epoch 1/3" in caplog.text) is not terminal  # on a terminal the bar says it


def test_debug_preset_is_debug_for_this_package_and_lightning_only(tmp_path: Path) -> None:
    r = run_cli(
        "ssd_lightning.train",
        "debug=fdr",
        "model.net.weights=none",
        "model.net.image_size=128",
        "data.batch_size=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    debug = [ln for ln in (r.stdout + r.stderr).splitlines() if "][DEBUG]" in ln]
    sources = {ln.split("][")[1] for ln in debug}
    assert sources and all(
        s.startswith(("ssd_lightning", "lightning", "__main__")) for s in sources
    )
    assert not any(s.startswith(("PIL", "matplotlib")) for s in sources)
    assert "SSDLitModule" not in r.stdout + r.stderr  # extras.print_config is off by default


def test_a_config_error_is_printed_once(tmp_path: Path) -> None:
    r = run_cli(
        "ssd_lightning.train",
        "anchors=tall_skinny",
        "anchors.ratios=[0.5,-1.0]",
        f"hydra.run.dir={tmp_path}",
    )
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert out.count("every value must be a finite number > 0") == 1, out
    assert "every value must be" in (tmp_path / "train.log").read_text()  # and in the run's log


@pytest.mark.parametrize("tool", ["predict", "export", "anchors"])
def test_an_unknown_key_is_one_message_and_exit_status_2(tool: str) -> None:
    # Hydra reports it itself (before any task runs) over several lines with exit status 1, the
    # status of a run that failed; a mistake on the command line is the tools' one line and
    # exit status 2
    line = one_error_line(run_cli(f"ssd_lightning.{tool}", "no_such_key=1", "ckpt_path=x.pt"))
    assert line.startswith("Config error: Could not override 'no_such_key'"), line


@pytest.mark.parametrize(
    ("tool", "args", "needle"),
    [
        ("summarize", (), "multirun_dir"),
        ("summarize", ("x", "--metric"), "--metric"),
        ("anchors", ("--seeds", "many"), "--seeds"),
        ("benchmark", ("--bogus",), "--bogus"),
    ],
)
def test_an_argparse_mistake_is_one_line_and_exit_status_2(
    tool: str, args: tuple[str, ...], needle: str
) -> None:
    r = run_cli(f"ssd_lightning.{tool}", *args)
    line = one_error_line(r)
    assert line.startswith("Config error: "), r.stderr
    assert needle in line and "usage:" not in r.stderr


@pytest.mark.parametrize("tool", ["train", "anchors"])
def test_a_malformed_override_is_one_line_naming_it(tool: str) -> None:
    line = one_error_line(run_cli(f"ssd_lightning.{tool}", "seed=1", "anchors.ratios=[0.5"))
    assert line.startswith("Config error: anchors.ratios=[0.5: "), line


def test_a_missing_option_is_one_line_listing_the_options(tmp_path: Path) -> None:
    line = one_error_line(
        run_cli("ssd_lightning.train", "anchors=nope", f"hydra.run.dir={tmp_path}")
    )
    assert "anchors/nope" in line, line
    assert "dense_tall, pennfudan_fitted, ssd, tall_skinny" in line
    assert "search path" not in line
    # Hydra's own ValueError (no HydraException): its traceback goes too; the line says the way
    r = run_cli("ssd_lightning.train", "hparams_search=null", f"hydra.run.dir={tmp_path}")
    assert "Traceback" not in r.stderr
    assert one_error_line(r) == (
        "Config error: hparams_search=null: a config group is left out with ~hparams_search (or "
        "by not naming it); its options: hparams_search=<option>"
    )


# per tool: a line of its help, and the config groups it lists (only those it uses) / leaves out
HELP = {
    "train": ("augmentation:", {"anchors:", "optimizer:", "trainer:"}, set()),
    "evaluate": (
        "ckpt_path",
        {"data: coco, pennfudan", "trainer:"},
        {"anchors:", "augmentation:", "optimizer:"},
    ),
    "predict": ("input", {"paths:"}, {"trainer:", "data:", "augmentation:"}),
    "export": ("opset", set(), set()),
    "anchors": ("--figure", set(), set()),
    "summarize": ("multirun_dir", set(), set()),
    "benchmark": ("batch_sizes", set(), set()),
}


@pytest.mark.parametrize("tool", HELP)
def test_every_tool_has_help_listing_only_the_groups_it_uses(tool: str) -> None:
    r = run_cli(f"ssd_lightning.{tool}", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    needle, listed, left_out = HELP[tool]
    assert needle in r.stdout
    groups = r.stdout.split("== Config (")[0]
    assert all(g in groups for g in listed) and not any(g in groups for g in left_out), groups


def test_predict_writes_into_its_own_run_dir(tiny_run: dict, tmp_path: Path) -> None:
    logs = tmp_path / "outputs"
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={tiny_run['dir'] / 'checkpoints/last.ckpt'}",
        f"input={PENNFUDAN / 'PNGImages' / 'FudanPed00001.png'}",
        f"paths.log_dir={logs}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = list(logs.glob("predict/*/*/detections.json"))  # outputs/predict/<date>/<time>/
    assert len(found) == 1 and json.loads(found[0].read_text())["images"]
    assert (found[0].parent / "FudanPed00001_pred.png").is_file()


def test_durations_read_well() -> None:
    assert [format_duration(s) for s in (45.2, 1234.5, 7384)] == ["45s", "20m34s", "2h03m"]
