"""The hyperparameter search (``-m hparams_search=<name>``, Optuna): what a trial returns, and
what the search leaves behind.

A training run returns ``optimized_metric`` (``conf/train.yaml``; the search configs in
``conf/hparams_search/`` set it) to the sweeper. ``check_objective`` refuses, before training, a
metric no run logs and a loss the sweeper would maximize (or an mAP it would minimize);
``objective_value`` refuses, after it, a metric this run did not log. Optuna writes the best
trial to ``<sweep dir>/optimization_results.yaml``: ``read_results`` reads it for ``summarize``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.validation import never_validates
from ssd_lightning.core.plain import is_number

RESULTS_FILE = "optimization_results.yaml"  # written by the Optuna sweeper
# metric families whose direction is known (part of the name -> direction)
_DIRECTIONS = {
    "loss": "minimize",
    "mae": "minimize",
    "map": "maximize",
    "mar": "maximize",
    "accuracy": "maximize",
}


def metric_direction(metric: str) -> str | None:
    """minimize / maximize for the metrics whose direction is known, else None."""
    name = metric.rsplit("/", 1)[-1]
    return next((d for part, d in _DIRECTIONS.items() if part in name), None)


def _sweeper_direction(cfg: DictConfig) -> str | None:
    """The Optuna sweeper's direction: the search's config (``cfg.hydra``, before the trials), or
    this job's Hydra config (None outside an Optuna sweep, or when it has several objectives)."""
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction", default=None)
    if direction is None and HydraConfig.initialized():
        direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    if direction is None or OmegaConf.is_list(direction):
        return None
    return str(direction).rsplit(".", 1)[-1]  # "maximize", also from "Direction.maximize"


def _validates(cfg: DictConfig) -> bool:
    val_size = OmegaConf.select(cfg, "data.val_size", default=1)
    return not (val_size is not None and float(val_size) == 0)


def default_metric(cfg: DictConfig) -> str:
    """What a trial returns when ``optimized_metric`` is unset: val/map_50, or train/loss for a
    run without a validation split."""
    return "val/map_50" if _validates(cfg) else "train/loss"


def check_objective(cfg: DictConfig) -> str | None:
    """``cfg.optimized_metric`` checked before training; unset: the default metric inside a
    search (a direction to check it against), else None (no trial returns anything)."""
    metric = cfg.get("optimized_metric")
    if metric is None:
        if _sweeper_direction(cfg) is None:
            return None
        metric = default_metric(cfg)
    # here, not at the top: summarize imports this module and starts without Lightning
    from ssd_lightning.training.lit_module import LOGGED_METRICS

    if metric not in LOGGED_METRICS:
        raise ConfigError(
            f"optimized_metric={metric!r}: not a metric the run logs; allowed values are "
            + ", ".join(LOGGED_METRICS)
        )
    if metric.startswith("val/") and not _validates(cfg):
        raise ConfigError(
            f"optimized_metric={metric}: data.val_size=0 trains without a validation split, so "
            "no val/ metric is logged; use train/loss (hydra.sweeper.direction=minimize) or "
            "data.val_size > 0"
        )
    setting = never_validates(cfg)
    if metric.startswith("val/") and setting:
        raise ConfigError(
            f"optimized_metric={metric} with {setting}: the trials never validate, so they "
            "log no val/ metric; let them validate, or optimize train/loss "
            "(hydra.sweeper.direction=minimize)"
        )
    wanted, direction = metric_direction(metric), _sweeper_direction(cfg)
    if wanted is not None and direction is not None and direction != wanted:
        raise ConfigError(
            f"optimized_metric={metric} with hydra.sweeper.direction={direction}: "
            f"{metric} should be {wanted}d; set hydra.sweeper.direction={wanted}"
        )
    return metric


def objective_value(cfg: DictConfig, metrics: Mapping[str, Any]) -> float | None:
    """What the trial returns: ``metrics[cfg.optimized_metric]`` (NaN when not finite, which
    Optuna records as a failed trial); unset: ``default_metric``."""
    metric = cfg.get("optimized_metric")
    if metric is None:  # a plain run, or a search returning its default
        value = metrics.get(default_metric(cfg))
        return None if value is None else float(value)
    if metric not in metrics:
        logged = sorted(k for k in metrics if "/" in k)
        raise ConfigError(
            f"optimized_metric={metric}: this run did not log it; it logged {', '.join(logged)}"
        )
    value = metrics[metric]
    return float(value) if value is not None and math.isfinite(value) else math.nan


class ObjectiveCheck(Callback):
    """Before the first trial (``conf/hparams_search/``): ``check_objective``, and the search's
    own config as a run would check it (``validate_config``, the data and model constructors),
    so a mistake that every trial would make stops the search with one message, exit status 2,
    instead of failing each trial (which the sweeper reports three times, each with the trial's
    overrides). A sampled value a trial cannot use still fails that trial alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # imported here: summarize imports this module and starts without the model code
        from ssd_lightning.config.cli import ALL_USER_ERRORS, exit_with_error, kind_of
        from ssd_lightning.config.compose import instantiate_checked
        from ssd_lightning.config.validation import validate_config

        try:
            check_objective(config)
            validate_config(config)
            instantiate_checked(config.data, "data")
            model = config.copy()  # built for its checks: no weights to fetch or load here
            OmegaConf.update(model, "model.net.weights", "none", force_add=True)
            instantiate_checked(model.model, "model")
        except ALL_USER_ERRORS as e:
            # the tools' one exit path; SystemExit, since Hydra turns a callback's exceptions
            # into warnings
            exit_with_error(e, kind_of(e))


@dataclass
class SearchResults:
    """Optuna's ``optimization_results.yaml``: the best trial's parameters and value."""

    path: Path
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    solutions: list[dict[str, Any]] = field(default_factory=list)  # multi-objective: the front


def read_results(sweep_dir: str | Path) -> SearchResults | None:
    """The search's results in ``sweep_dir``, or None when it holds none (a grid sweep, or a
    search that has not finished)."""
    path = Path(sweep_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FileNotFoundError(f"{path}: unreadable ({e})") from None
    value = raw.get("best_value")
    return SearchResults(
        path=path,
        best_params=dict(raw.get("best_params") or {}),
        best_value=None if value is None else float(value),
        solutions=list(raw.get("solutions") or []),
    )


def same_value(override: str, param: Any) -> bool:
    """A job's override value (a string) equals a sampled parameter."""
    if not is_number(param, finite=False):
        return override == str(param)
    try:
        return math.isclose(float(override), float(param), rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return False
