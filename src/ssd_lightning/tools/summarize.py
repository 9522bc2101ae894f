"""Summarize a Hydra multirun: ``python -m ssd_lightning.summarize <multirun dir> [--metric M]
[--out DIR] [--ascending]``.

One row per job dir (a folder holding ``.hydra/overrides.yaml``): its overrides and its final
metrics from ``<job>/metrics.json`` (written by the training run: val/map_50, val/map, train/loss,
epochs, wall time), sorted by ``--metric`` (best first; losses ascending). Printed as a table and
written to ``<out>/summary.csv``, ``<out>/summary.md`` and ``<out>/summary.png`` (a bar chart of the
metric). Jobs without a ``metrics.json`` are kept and marked ``failed`` (with the last error line of
their log when there is one); a job whose metric is missing or not finite is marked ``no metric``.

A job's ``tags`` (the run's ``tags=[...]``, from metrics.json, else its composed config) are a
column; ``--tag T`` (repeatable) keeps the jobs tagged with every T.

A job's ``job_status.json`` (Hydra's COMPLETED / FAILED with the exception, written by
``config.job_status.JobStatusCallback``, or INTERRUPTED by a signal) decides its status when
present.

An Optuna search (``-m hparams_search=<name>``) comes first: the best value and parameters from
Optuna's ``optimization_results.yaml``, the best trial's job and the command that reruns it. Its
``optimized_metric`` and direction are then the default sort.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssd_lightning.config.errors import ConfigError, ToolParser
from ssd_lightning.config.job_status import read_job_status
from ssd_lightning.core.plain import is_number
from ssd_lightning.tools.search import SearchResults, read_results, same_value
from ssd_lightning.visualize import figure_to_png, plot_summary

DEFAULT_METRIC = "val/map_50"
# the header of one mistake found by the configuration check (config.validation)
_CHECK_HEADER = re.compile(r"^(?:\w+ error: )?invalid configuration: ")
# (column, metrics.json keys tried in order)
METRIC_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("val/map_50", ("val/map_50",)),
    ("val/map", ("val/map",)),
    # the exported model's monitored value (the last val/map_50 can be an unlucky epoch's)
    ("best", ("best_model_score",)),
    ("train/loss", ("train/loss", "train/loss_epoch")),
    ("epochs", ("epoch", "epochs")),
    ("wall_s", ("wall_time_s",)),
]
OK, FAILED, NO_METRIC, INTERRUPTED = "ok", "failed", "no metric", "interrupted"


@dataclass
class Job:
    """One job of a sweep. ``metrics`` holds every scalar of metrics.json."""

    name: str  # path relative to the multirun dir, e.g. "0"
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = OK
    note: str = ""
    tags: list[str] = field(default_factory=list)

    def value(self, column: str) -> float | None:
        keys = dict(METRIC_COLUMNS).get(column, (column,))
        for k in keys:
            v = self.metrics.get(k)
            if is_number(v, finite=False):
                return float(v) if math.isfinite(v) else None
        return None


def _read_overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        return {"<overrides>": f"unreadable: {e}"}
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _last_error(job_dir: Path) -> str:
    """The last ERROR / exception line of the job's Hydra log(s), or ""."""
    error = ""
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            lines = log_file.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "[ERROR]" in line or re.match(r"^\w+(Error|Exception)\b", line):
                error = line.strip()
    return error


def one_line(error: str) -> str:
    """An error message as one line, without the header of the configuration check ("Config
    error: invalid configuration: <item>", or the header then one "- item" per line): the
    items joined with "; "."""
    lines = [ln.strip().removeprefix("- ") for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.endswith("invalid configuration:")] or lines
    return "; ".join(_CHECK_HEADER.sub("", ln, count=1) for ln in lines)


def _read_tags(job: Job, metrics: dict[str, Any]) -> list[str]:
    """The run's tags: metrics.json's, else (a run that wrote none) its composed config's."""
    tags = metrics.get("tags")
    if tags is None:
        tags = _job_config(job, "config.yaml", "tags")
    if isinstance(tags, str):
        return [tags]
    return [str(t) for t in tags] if isinstance(tags, list) else []


def filter_tags(jobs: Sequence[Job], tags: Sequence[str]) -> list[Job]:
    """The jobs tagged with every one of ``tags``. Raises FileNotFoundError naming the tags found
    when none is."""
    kept = [j for j in jobs if set(tags) <= set(j.tags)]
    if jobs and not kept:
        found = sorted({t for j in jobs for t in j.tags})
        raise FileNotFoundError(
            f"--tag {' --tag '.join(tags)}: no job has these tags; the jobs' tags: "
            f"{', '.join(found) or 'none'}"
        )
    return kept


def check_metric(jobs: Sequence[Job], metric: str) -> None:
    """A sort key that no job's metrics.json has (a typo: ``--metric val/mAP``) raises
    ConfigError naming the metrics there are; jobs that wrote no metrics say nothing either way."""
    keys = dict(METRIC_COLUMNS).get(metric, (metric,))
    written = [j.metrics for j in jobs if j.metrics]
    if written and not any(k in m for m in written for k in keys):
        there = {k for m in written for k, v in m.items() if isinstance(v, int | float)}
        names = [c for c, _ in METRIC_COLUMNS] + sorted(
            there - {k for _, ks in METRIC_COLUMNS for k in ks}
        )
        raise ConfigError(f"--metric {metric}: no job has it; the metrics: {', '.join(names)}")


def find_jobs(multirun_dir: str | Path) -> list[Job]:
    """Every job dir under ``multirun_dir`` (any depth), read. Raises FileNotFoundError with a
    message that names the folder when it is missing or holds no job."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun dir {root} does not exist")
    job_dirs = sorted(
        (p.parent.parent for p in root.rglob(".hydra/overrides.yaml")),
        # numbered jobs in number order, named ones (e.g. hydra.run.dir=<sweep>/<name>) after
        key=lambda p: [
            (0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.relative_to(root).parts
        ],
    )
    if not job_dirs:
        raise FileNotFoundError(
            f"{root}: no Hydra job dirs (folders with .hydra/overrides.yaml); pass the sweep dir, "
            "e.g. outputs/multirun/<date>/<time>"
        )
    # evaluate / predict / export runs are Hydra job dirs too (outputs/evaluate/..., or a
    # hydra.run.dir beside the training runs): no training job, so not a failed one either
    job_dirs = [d for d in job_dirs if _config_name(d) in (None, "train")]
    if not job_dirs:
        raise FileNotFoundError(
            f"{root}: no training job dirs (only evaluate / predict / export runs); pass the "
            "sweep dir, e.g. outputs/multirun/<date>/<time>"
        )
    jobs = []
    for d in job_dirs:
        job = Job(name=str(d.relative_to(root)) or ".", path=d, overrides=_read_overrides(d))
        metrics_path = d / "metrics.json"
        raw: dict[str, Any] = {}
        if metrics_path.is_file():
            try:
                raw = json.loads(metrics_path.read_text())
                if not isinstance(raw, dict):
                    raise ValueError(f"a JSON {type(raw).__name__}, not an object")
                job.metrics = {k: v for k, v in raw.items() if not isinstance(v, dict | list)}
            except (OSError, ValueError) as e:  # ValueError: bad JSON, not UTF-8, not an object
                raw = {}
                job.status, job.note = FAILED, f"unreadable metrics.json: {e}"
        else:
            job.status = FAILED
            job.note = _last_error(d) or "no metrics.json (crashed, killed or still running)"
        job.tags = _read_tags(job, raw)
        hydra_status = read_job_status(d)
        if hydra_status.get("status") == "FAILED":  # Hydra's word wins over a stale metrics.json
            job.status = FAILED
            job.note = one_line(hydra_status.get("error") or job.note)
        elif hydra_status.get("status") == "INTERRUPTED":  # stopped by a signal, resumable
            job.status = INTERRUPTED
            job.note = one_line(hydra_status.get("error") or "")
        jobs.append(job)
    return jobs


def sort_jobs(jobs: Sequence[Job], metric: str, ascending: bool | None = None) -> list[Job]:
    """Best first by ``metric``; ascending for losses unless told; failed jobs and jobs without
    the metric last (in their original order)."""
    if ascending is None:
        ascending = "loss" in metric
    ranked = [j.status == OK and j.value(metric) is not None for j in jobs]
    with_value = [j for j, r in zip(jobs, ranked, strict=True) if r]
    without = [j for j, r in zip(jobs, ranked, strict=True) if not r]
    with_value.sort(key=lambda j: j.value(metric), reverse=not ascending)
    for j in without:
        if j.status == OK:
            j.status, j.note = NO_METRIC, j.note or f"{metric} missing or not finite"
    return with_value + without


def _columns(jobs: Sequence[Job], metric: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(varying override keys, metric columns, overrides common to all jobs)."""
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j.overrides if k not in keys]
    common = {}
    varying = []
    for k in keys:
        values = {j.overrides.get(k) for j in jobs}
        if len(values) == 1 and len(jobs) > 1:
            common[k] = next(iter(values)) or ""
        else:
            varying.append(k)
    metric_cols = [c for c, _ in METRIC_COLUMNS]
    if metric not in metric_cols:
        metric_cols.insert(0, metric)
    return varying, metric_cols, common


def _fmt(v: float | None, column: str) -> str:
    if v is None:
        return "-"
    if column == "epochs":
        return str(int(v))
    if column == "wall_s":
        return f"{v:.1f}"
    return f"{v:.4f}"


def rows(
    jobs: Sequence[Job], metric: str, all_overrides: bool = False, short: bool = False
) -> list[dict[str, str]]:
    """Table rows (strings): job, status, overrides (``short``: long floats to 4 digits),
    metrics, note."""
    varying, metric_cols, common = _columns(jobs, metric)
    keys = list(common) + varying if all_overrides else varying
    tagged = any(j.tags for j in jobs)
    if tagged:  # a tags=[...] override is the tags column
        keys = [k for k in keys if k != "tags"]
    show = _short if short else str
    out = []
    for rank, j in enumerate(jobs, start=1):
        row = {"rank": str(rank), "job": j.name, "status": j.status}
        if tagged:
            row["tags"] = ",".join(j.tags)
        row.update({k: show(j.overrides.get(k, "")) for k in keys})
        row.update({c: _fmt(j.value(c), c) for c in metric_cols})
        row["note"] = j.note
        out.append(row)
    return out


def format_table(table: list[dict[str, str]]) -> str:
    """Fixed-width text table."""
    if not table:
        return "(no jobs)"
    cols = list(table[0])
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    rule = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in table]
    return "\n".join([line, rule, *body])


def format_markdown(table: list[dict[str, str]], header: str = "") -> str:
    cols = list(table[0]) if table else ["job"]

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [header, ""] if header else []
    lines.append("| " + " | ".join(cell(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def _plot(jobs: Sequence[Job], metric: str, title: str) -> Any:
    varying, _, _ = _columns(jobs, metric)
    labels, values, notes = [], [], []
    for j in jobs:
        desc = ", ".join(f"{k}={j.overrides[k]}" for k in varying if k in j.overrides) or j.name
        v = j.value(metric) if j.status == OK else None
        labels.append(f"{j.name}: {desc}" + ("" if v is not None else f"  [{j.status}]"))
        values.append(v)
        notes.append(j.status)
    return plot_summary(labels, values, metric, notes, title)


def _config_name(job_dir: Path) -> str | None:
    """The Hydra config the job ran (train, evaluate, predict, export); None when unknown."""
    name = _hydra_file_value(job_dir, "hydra.yaml", "hydra.job.config_name")
    return name if isinstance(name, str) else None


def _job_config(job: Job, name: str, key: str) -> Any:
    """A value of the job's composed config (``.hydra/config.yaml`` or ``hydra.yaml``)."""
    return _hydra_file_value(job.path, name, key)


def _hydra_file_value(job_dir: Path, name: str, key: str) -> Any:
    try:
        node = yaml.safe_load((job_dir / ".hydra" / name).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def search_defaults(jobs: Sequence[Job]) -> tuple[str | None, bool | None]:
    """(optimized_metric, ascending) of the search the jobs ran, or None where not set."""
    if not jobs:
        return None, None
    metric = _job_config(jobs[0], "config.yaml", "optimized_metric")
    direction = _job_config(jobs[0], "hydra.yaml", "hydra.sweeper.direction")
    ascending = {"minimize": True, "maximize": False}.get(str(direction).rsplit(".", 1)[-1])
    return (str(metric) if metric else None), ascending


def best_trial(jobs: Sequence[Job], results: SearchResults) -> Job | None:
    """The job whose overrides hold Optuna's best parameters."""
    params = results.best_params
    for job in jobs:
        if params and all(
            k in job.overrides and same_value(job.overrides[k], v) for k, v in params.items()
        ):
            return job
    return None


def search_report(jobs: Sequence[Job], results: SearchResults) -> list[str]:
    """The search's best value (of its own optimized_metric and direction, whatever the table
    is sorted by), parameters and rerun command, as lines."""
    if results.solutions:  # several objectives: Optuna keeps the Pareto front
        lines = [f"Optuna search ({results.path.name}): {len(results.solutions)} Pareto solutions"]
        lines += [f"  values {s.get('values')}: {s.get('params')}" for s in results.solutions]
        return lines
    best = best_trial(jobs, results)
    where = f" in job {best.name} ({best.path})" if best else ""
    value = "-" if results.best_value is None else f"{results.best_value:.4f}"
    metric, ascending = search_defaults(jobs)
    direction = "" if ascending is None else f" ({'minimize' if ascending else 'maximize'})"
    lines = [
        f"Optuna search: best {metric or 'objective'} = {value}{direction}{where}",
        "best parameters:",
        *(f"  {k} = {_short(str(v))}" for k, v in results.best_params.items()),
    ]
    if best is not None:
        model = next(best.path.glob("*_best.pt"), None)
        if model is not None:
            lines.append(f"its model: {model}")
        overrides = " ".join(shlex.quote(f"{k}={v}") for k, v in best.overrides.items())
        lines.append(f"rerun it: python -m ssd_lightning.train {overrides}")
    return lines


def _short(value: str) -> str:
    """A sampled float (0.23469605520726605) as 4 significant digits, for the eye."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value and len(value) > 8 else value


def sort_order(jobs: Sequence[Job], metric: str | None, ascending: bool | None) -> tuple[str, bool]:
    """The metric to sort by and its order: as given, else the search's optimized_metric and
    direction, else val/map_50 descending (metrics named *loss* ascending; ``best``, the
    exported model's score, as its monitor: ascending when the jobs monitored a loss)."""
    searched_metric, searched_ascending = search_defaults(jobs)
    metric = metric or searched_metric or DEFAULT_METRIC
    if ascending is None:
        ascending = searched_ascending if metric == searched_metric else None
    named = metric
    if metric == "best":
        monitors = {str(j.metrics.get("best_monitor", "")) for j in jobs} - {""}
        named = monitors.pop() if len(monitors) == 1 else metric
    return metric, ("loss" in named if ascending is None else ascending)


def summarize(
    multirun_dir: str | Path,
    metric: str | None = None,
    out: str | Path | None = None,
    ascending: bool | None = None,
    tags: Sequence[str] = (),
) -> tuple[list[Job], dict[str, Path]]:
    """Read, sort and write the summary of a multirun. Returns (sorted jobs, written files).
    ``metric`` / ``ascending`` default to the search's optimized_metric and direction, else
    val/map_50 (descending; losses ascending); ``tags``: only the jobs with all of them."""
    root = Path(multirun_dir)
    found = filter_tags(find_jobs(root), tags)
    if metric is not None:
        check_metric(found, metric)
    metric, ascending = sort_order(found, metric, ascending)
    jobs = sort_jobs(found, metric, ascending)
    outdir = Path(out) if out is not None else root
    outdir.mkdir(parents=True, exist_ok=True)
    _, _, common = _columns(jobs, metric)
    files = {
        "csv": outdir / "summary.csv",
        "md": outdir / "summary.md",
        "png": outdir / "summary.png",
    }
    full = rows(jobs, metric, all_overrides=True)
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(full[0]))
        writer.writeheader()
        writer.writerows(full)
    n_failed = sum(j.status == FAILED for j in jobs)
    header = (
        f"# Sweep summary: {root}\n\nSorted by `{metric}` "
        f"({'ascending' if ascending else 'descending'}). {len(jobs)} jobs, {n_failed} failed."
    )
    if common:
        header += "\n\nCommon overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items())
    results = read_results(root)
    if results is not None:
        report = search_report(jobs, results)
        header += "\n\n" + "\n".join(f"    {line}" for line in report)
    files["md"].write_text(format_markdown(rows(jobs, metric, short=True), header))
    figure_to_png(_plot(jobs, metric, title=f"{root.name}: {metric}"), files["png"])
    return jobs, files


def main(argv: Sequence[str] | None = None) -> None:
    parser = ToolParser(
        prog="python -m ssd_lightning.summarize",
        description="Summarize a Hydra multirun of ssd_lightning.train: one row per job with its "
        "overrides and final metrics, sorted; writes summary.csv, summary.md, summary.png.",
    )
    parser.add_argument("multirun_dir", help="the sweep dir, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument(
        "--metric",
        default=None,
        help="sort key, any key of metrics.json (default: the search's optimized_metric, else "
        f"{DEFAULT_METRIC}; also: val/map, best (the exported model's monitored value), "
        "train/loss, epochs, wall_s)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: the multirun dir)")
    parser.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        help="only the jobs with this tag (the run's tags=[...]); repeat for several (all needed)",
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--ascending",
        dest="ascending",
        action="store_true",
        default=None,
        help="smallest first (default for metrics with 'loss' in the name)",
    )
    order.add_argument(
        "--descending",
        dest="ascending",
        action="store_false",
        help="largest first (default otherwise)",
    )
    args = parser.parse_args(argv)
    jobs, files = summarize(args.multirun_dir, args.metric, args.out, args.ascending, args.tags)
    metric, ascending = sort_order(jobs, args.metric, args.ascending)
    results = read_results(args.multirun_dir)
    if results is not None:
        print("\n".join(search_report(jobs, results)) + "\n")
    _, _, common = _columns(jobs, metric)
    if common:
        print("common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()))
    print(format_table(rows(jobs, metric, short=True)))
    failed = [j.name for j in jobs if j.status == FAILED]
    if failed:
        print(f"\n{len(failed)} failed job(s): {', '.join(failed)}")
    stopped = [j.name for j in jobs if j.status == INTERRUPTED]
    if stopped:
        print(f"\n{len(stopped)} interrupted job(s) (resume=<job dir>): {', '.join(stopped)}")
    print("\nwritten: " + ", ".join(str(p) for p in files.values()))
