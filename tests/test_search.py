"""The Optuna search: trials train with the sampled anchors and return optimized_metric; the
search writes its results and summarize shows the best parameters first."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_cfg, one_error_line, run_cli, tiny
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ssd_lightning.config.compose import instantiate_checked
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.validation import validate_config
from ssd_lightning.tools.search import check_objective, objective_value

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

TRIALS = 2


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep = tmp_path_factory.mktemp("search")
    r = run_cli(
        "ssd_lightning.train",
        "-m",
        "hparams_search=anchors_optuna",
        f"hydra.sweeper.n_trials={TRIALS}",
        *tiny(
            "logger=none",
            f"hydra.sweep.dir={sweep}",
            trainer__limit_train_batches=1,
            callbacks__prediction_images__every_n_epochs=100,
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_trials_train_the_sampled_anchors_and_return_the_metric(search: Path) -> None:
    results = yaml.safe_load((search / "optimization_results.yaml").read_text())
    params = results["best_params"]
    assert len(params) == 6 * 3 + 7  # every map's three ratios, the seven scales
    values = []
    for n in range(TRIALS):
        job = search / str(n)
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        anchors = yaml.safe_load((job / "config_resolved.yaml").read_text())["model"]["net"][
            "anchors"
        ]
        for key in params:  # the network was built from this trial's sample
            _, field, *index = key.split(".")
            value = anchors[field]
            for i in index:
                value = value[int(i)]
            assert value == pytest.approx(float(overrides[key]))
        values.append(json.loads((job / "metrics.json").read_text())["val/map_50"])
    assert results["best_value"] == pytest.approx(max(values))  # maximized, as configured


@pytest.mark.slow
def test_summarize_shows_the_best_parameters_first(search: Path, tmp_path: Path) -> None:
    r = run_cli("ssd_lightning.summarize", str(search), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Optuna search: best val/map_50 = ")
    assert lines[1] == "best parameters:" and lines[2].startswith("  anchors.ratios.0.0 = ")
    rerun = next(line for line in lines if line.startswith("rerun it: "))
    assert "hparams_search=anchors_optuna" in rerun and "anchors.scales.6=" in rerun
    assert "Optuna search: best val/map_50" in (tmp_path / "summary.md").read_text()
    # sorted by another column, the search's best is still named by its own metric
    r = run_cli("ssd_lightning.summarize", str(search), "--metric", "train/loss")
    assert r.stdout.splitlines()[0].startswith("Optuna search: best val/map_50 = ")
    assert "(maximize)" in r.stdout.splitlines()[0]


def test_the_objective_is_checked(tmp_path: Path) -> None:
    cfg = make_cfg(tiny("hparams_search=anchors_optuna", "optimized_metric=train/loss"), tmp_path)
    with pytest.raises(ConfigError, match="set hydra.sweeper.direction=minimize"):
        check_objective(cfg)  # a loss the search would maximize
    cfg = make_cfg(tiny("optimized_metric=val/map", "data.val_size=0"), tmp_path)
    with pytest.raises(ConfigError, match="data.val_size=0"):
        check_objective(cfg)
    cfg = make_cfg(tiny("optimized_metric=map50"), tmp_path)
    with pytest.raises(ConfigError, match="optimized_metric='map50'"):
        check_objective(cfg)
    cfg = make_cfg(tiny("optimized_metric=val/map_small"), tmp_path)  # COCO's, not logged
    with pytest.raises(ConfigError, match="val/map_small': not a metric the run logs; allowed"):
        check_objective(cfg)
    cfg = make_cfg(tiny("optimized_metric=val/map_75"), tmp_path)
    assert check_objective(cfg) == "val/map_75"
    with pytest.raises(ConfigError, match="did not log it; it logged train/loss, val/map_50"):
        objective_value(cfg, {"train/loss": 1.0, "val/map_50": 0.5, "epoch": 3})
    assert objective_value(cfg, {"val/map_75": 0.25}) == 0.25
    assert math.isnan(objective_value(cfg, {"val/map_75": float("nan")}))


def test_a_search_without_a_metric_checks_the_one_its_trials_return(tmp_path: Path) -> None:
    search = ("hparams_search=anchors_optuna", "optimized_metric=null")
    cfg = make_cfg(tiny(*search, "data.val_size=0"), tmp_path)  # trials return train/loss
    with pytest.raises(ConfigError, match="train/loss with hydra.sweeper.direction=maximize"):
        check_objective(cfg)
    cfg = make_cfg(tiny(*search, "hydra.sweeper.direction=minimize"), tmp_path)
    with pytest.raises(ConfigError, match="val/map_50 with hydra.sweeper.direction=minimize"):
        check_objective(cfg)
    assert check_objective(make_cfg(tiny(*search), tmp_path)) == "val/map_50"
    assert check_objective(make_cfg(tiny("optimized_metric=null"), tmp_path)) is None  # no search
    cfg = make_cfg(tiny(*search[:1], "optimized_metric=train/loss_epoch"), tmp_path)
    with pytest.raises(ConfigError, match="direction=minimize"):  # a metric the run logs
        check_objective(cfg)


@pytest.mark.parametrize(
    "never",
    [
        ("trainer.limit_val_batches=0",),
        ("trainer.max_epochs=3", "trainer.check_val_every_n_epoch=4"),
    ],
)
def test_trials_that_never_validate_are_refused_before_the_first(tmp_path: Path, never) -> None:
    cfg = make_cfg(tiny("hparams_search=anchors_optuna", *never), tmp_path)
    with pytest.raises(ConfigError, match="never validate"):
        check_objective(cfg)
    if "trainer.limit_val_batches=0" in never:  # a plain run too (its best model: by val/map)
        with pytest.raises(ConfigError, match="the run never validates, but callbacks"):
            validate_config(cfg)
    else:  # a plain run may stop there and resume for more epochs
        validate_config(cfg)
    validate_config(make_cfg(tiny(*never, "data.val_size=0"), tmp_path))  # by train/loss: fine


SEARCHES = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("name", SEARCHES)
def test_every_searched_key_exists_and_every_choice_builds(name: str, tmp_path: Path) -> None:
    """A typo in a search space would fail only at the first trial (or, for a group, never be
    searched): every key is in the composed config, every choice composes and builds."""
    search = [f"hparams_search={name}", "model.net.weights=none", "model.net.image_size=128"]
    base = make_cfg(search, tmp_path)
    hydra = HydraConfig.get()
    for key, spec in hydra.sweeper.params.items():
        options = re.fullmatch(r"choice\((.*)\)", str(spec).strip())
        if key in hydra.runtime.choices:  # a config group: its options are files
            assert options, f"{name}: {key}: {spec}"
        if not options:
            assert OmegaConf.select(base, key) is not None, f"{name}: no key {key}"
            continue
        for value in (v.strip() for v in options.group(1).split(",")):
            cfg = make_cfg([*search, f"{key}={value}"], tmp_path)
            validate_config(cfg)
            instantiate_checked(cfg.model, "model")


def test_an_objective_no_trial_can_return_stops_the_search_before_it_starts(
    tmp_path: Path,
) -> None:
    # each trial refused it alone: the sweeper and Hydra printed the message three times, with
    # every trial's overrides, exit status 1
    r = run_cli(
        "ssd_lightning.train",
        "-m",
        "hparams_search=anchors_optuna",
        "optimized_metric=val/nosuch",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("optimized_metric='val/nosuch': not a metric the run logs") == 1, out
    assert "Error executing job" not in out and not (tmp_path / "sweep" / "0").exists()


def test_a_stored_study_draws_anew_when_continued(tmp_path: Path) -> None:
    # the same seed in a second process would replay the first process's trials
    make_cfg(tiny("hparams_search=anchors_optuna"), tmp_path)
    assert HydraConfig.get().sweeper.sampler.seed == 12345  # in memory: reproducible
    stored = f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}"
    make_cfg(tiny("hparams_search=anchors_optuna", stored), tmp_path)
    assert HydraConfig.get().sweeper.sampler.seed is None


def test_a_mistake_every_trial_would_make_stops_the_search_first(tmp_path: Path) -> None:
    r = run_cli(
        "ssd_lightning.train",
        "-m",
        "hparams_search=anchors_optuna",
        "hydra.sweeper.n_trials=2",
        "data.batch_size=-1",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert one_error_line(r) == "Config error: data.batch_size=-1: allowed values are integers >= 1"
    assert not (tmp_path / "0").exists()  # no trial ran
