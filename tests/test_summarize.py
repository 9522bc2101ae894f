"""`python -m ssd_lightning.summarize` on a real 2-job multirun made here (which also checks that
the default callbacks write the prediction figures into each job dir) plus fake failed jobs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, tiny
from PIL import Image

from ssd_lightning.tools.summarize import (
    FAILED,
    OK,
    find_jobs,
    main,
    sort_jobs,
    sort_order,
    summarize,
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = tmp / "multirun"
    r = run_cli(
        "ssd_lightning.train",
        "-m",
        "anchors=tall_skinny,ssd",
        *tiny(trainer__limit_train_batches=1),
        "tags=[sweep,tiny]",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp / 'logs'}",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    # a third job that crashed: Hydra made its dir and log, the fit never wrote metrics.json
    failed = sweep / "2"
    (failed / ".hydra").mkdir(parents=True)
    overrides = (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    (failed / ".hydra" / "overrides.yaml").write_text(
        overrides.replace("anchors=ssd", "anchors=dense_tall")
    )
    (failed / "train.log").write_text(
        "[2026-01-01 10:00:00,000][__main__][INFO] - run dir: x\n"
        "[2026-01-01 10:00:05,000][__main__][ERROR] - training crashed\n"
        "RuntimeError: CUDA out of memory\n"
    )
    # a fourth whose metrics.json exists but Hydra recorded the job as failed
    stale = sweep / "3"
    shutil.copytree(sweep / "1", stale)
    (stale / "job_status.json").write_text('{"status": "FAILED", "error": "ValueError: bad ratio"}')
    return sweep


def test_figure_callback_in_a_training_run(sweep: Path) -> None:
    for job in ("0", "1"):
        for name in ("feature_maps.png", "predictions.png"):
            with Image.open(sweep / job / name) as im:
                assert im.size[0] > 100 and im.size[1] > 100


def test_job_status_callback(sweep: Path) -> None:
    for job in ("0", "1"):
        status = json.loads((sweep / job / "job_status.json").read_text())
        assert status["status"] == "COMPLETED" and status["error"] is None
        assert isinstance(status["return_value"], float)  # the value a sweeper would optimize


def test_jobs_read_and_sorted(sweep: Path) -> None:
    jobs = find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    assert [j.overrides["anchors"] for j in jobs] == ["tall_skinny", "ssd", "dense_tall", "ssd"]
    assert [j.status for j in jobs] == [OK, OK, FAILED, FAILED]
    assert jobs[2].note == "RuntimeError: CUDA out of memory"
    assert jobs[3].note == "ValueError: bad ratio"
    jobs = jobs[:3]
    for j in jobs[:2]:
        assert j.value("epochs") == 1
        assert j.value("val/map_50") is not None and j.value("train/loss") > 0
        assert 0 < j.value("wall_s") < 600
        best = json.loads((j.path / "metrics.json").read_text())["best_model_score"]
        assert j.value("best") == best
    by_loss = sort_jobs(jobs, "train/loss")  # losses: smallest first, failed last
    losses = [j.value("train/loss") for j in by_loss[:2]]
    assert losses == sorted(losses) and by_loss[2].name == "2"
    by_loss_desc = sort_jobs(jobs, "train/loss", ascending=False)
    assert [j.name for j in by_loss_desc[:2]] == [j.name for j in by_loss[:2]][::-1]


def test_cli_writes_table_csv_markdown_and_chart(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main([str(sweep), "--metric", "train/loss", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "2 failed job(s): 2, 3" in printed and "dense_tall" in printed
    assert "common overrides:" in printed and "data.batch_size=2" in printed
    with (tmp_path / "out" / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "failed"]
    assert [r["tags"] for r in table] == ["sweep,tiny", "sweep,tiny", "", "sweep,tiny"]
    assert {
        "anchors",
        "val/map_50",
        "val/map",
        "best",
        "train/loss",
        "epochs",
        "wall_s",
        "data.batch_size",
    } <= set(table[0])
    assert float(table[0]["train/loss"]) <= float(table[1]["train/loss"])
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| rank | job | status | tags | anchors |" in md and "| failed |" in md
    with Image.open(tmp_path / "out" / "summary.png") as im:
        assert im.format == "PNG" and im.size == (900, round((1.0 + 0.45 * 4) * 100))


def test_tags_column_and_filter(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The run's tags=[...] (metrics.json) are a column; --tag keeps the jobs with all of them."""
    assert [j.tags for j in find_jobs(sweep)] == [["sweep", "tiny"]] * 2 + [[], ["sweep", "tiny"]]
    main([str(sweep), "--tag", "sweep", "--tag", "tiny", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    header = printed.splitlines()[1]  # after the common overrides
    assert header.split()[:4] == ["rank", "job", "status", "tags"]
    assert "sweep,tiny" in printed and "dense_tall" not in printed  # job 2 has no tags
    with pytest.raises(FileNotFoundError, match="no job has these tags; the jobs' tags: sweep, ti"):
        summarize(sweep, out=tmp_path / "none", tags=["nope"])


def test_default_metric_and_out_dir(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    jobs, files = summarize(copy)
    assert files["csv"].parent == copy and files["png"].is_file()
    assert jobs[-1].status == FAILED


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    r = run_cli("ssd_lightning.summarize", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Hydra job dirs"):
        main([str(tmp_path / "empty")])


def test_named_job_dirs_beside_numbered_ones(sweep: Path, tmp_path: Path) -> None:
    """Runs added to a sweep dir by name (hydra.run.dir=<sweep>/<name>, e.g. a rerun) are read
    with the numbered jobs: numbers in order first, then the names."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    shutil.copytree(sweep / "1", copy / "rerun_seed2")
    shutil.copytree(sweep / "0", copy / "10")
    assert [j.name for j in find_jobs(copy)] == ["0", "1", "2", "3", "10", "rerun_seed2"]


def test_best_sorts_as_its_monitor(tmp_path: Path) -> None:
    """``best`` is the exported model's score: a loss (runs without validation) sorts
    ascending, a mAP descending."""
    for monitor, scores in (("train/loss", (2.0, 0.5)), ("val/map_50", (0.2, 0.7))):
        root = tmp_path / monitor.replace("/", "_")
        for job, score in enumerate(scores):
            (root / str(job) / ".hydra").mkdir(parents=True)
            (root / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
            metrics = {"best_model_score": score, "best_monitor": monitor}
            (root / str(job) / "metrics.json").write_text(json.dumps(metrics))
        jobs = find_jobs(root)
        metric, ascending = sort_order(jobs, "best", None)
        assert [j.name for j in sort_jobs(jobs, metric, ascending)] == ["1", "0"], monitor


def test_broken_job_files_are_a_failed_job_not_a_crash(tmp_path: Path) -> None:
    """A job whose metrics.json is valid JSON but no object, or whose job_status.json is not
    even UTF-8 (a killed write, a stray file), is listed as failed with the reason."""
    for name, metrics in (("0", "[1, 2]"), ("1", '{"val/map": 0.5}')):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("- anchors=ssd\n")
        (job / "metrics.json").write_text(metrics)
        (job / "job_status.json").write_bytes(b"\x00\xff")
    jobs = {j.name: j for j in find_jobs(tmp_path)}
    assert jobs["0"].status == FAILED and "not an object" in jobs["0"].note
    assert jobs["1"].status == OK


def test_other_tools_runs_are_no_jobs(tmp_path: Path) -> None:
    """An evaluate / predict / export run dir beside the training runs (outputs/evaluate/...)
    is no training job: left out, not listed as a failed one."""
    for name, config in (("train", "train"), ("eval", "evaluate"), ("export", "export")):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    config_name: {config}\n")
    (tmp_path / "train" / "metrics.json").write_text('{"val/map": 0.5}')
    assert [(j.name, j.status) for j in find_jobs(tmp_path)] == [("train", OK)]
    with pytest.raises(FileNotFoundError, match="no training job dirs"):
        find_jobs(tmp_path / "eval")


def test_a_metric_no_job_has_is_a_clear_error(tmp_path: Path) -> None:
    """A typo in --metric names the metrics the jobs have instead of ranking every job as
    'no metric'; a metric that only some jobs have still sorts."""
    for job, metrics in (("0", {"val/map": 0.5, "val/loss": 2.0}), ("1", {"val/map": 0.4})):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
    r = run_cli("ssd_lightning.summarize", str(tmp_path), "--metric", "val/mAP")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--metric val/mAP: no job has it" in r.stderr and "val/map" in r.stderr
    assert not (tmp_path / "summary.csv").exists()
    jobs, _ = summarize(tmp_path, metric="val/loss")
    assert [j.name for j in jobs] == ["0", "1"] and jobs[1].status == "no metric"
