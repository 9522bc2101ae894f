"""A feature whose optional dependency (pip extra, Hydra plugin) is missing says which one, in one
message, through the tools' one exit path."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import run_cli

from ssd_lightning.config.errors import MissingDependencyError
from ssd_lightning.config.extras import check_plugins, require

SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def test_require_names_the_package_and_the_extra() -> None:
    with pytest.raises(
        MissingDependencyError, match=r"needs onnxruntime.*pip install -e '\.\[onnx\]'"
    ):
        require("ssd_lightning_no_such_module", "onnxruntime", "onnx", "running an ONNX model")
    assert require("json", "json", "", "reading JSON").dumps([1]) == "[1]"


def test_plugins_are_checked_only_when_selected() -> None:
    check_plugins(["hparams_search=null", "anchors=ssd", "trainer.max_epochs=1"])


@pytest.mark.skipif(SUBMITIT, reason="hydra-submitit-launcher is installed here")
def test_a_missing_hydra_plugin_is_one_message() -> None:
    with pytest.raises(MissingDependencyError, match="pip install hydra-submitit-launcher"):
        check_plugins(["hydra/launcher=slurm"])
    r = run_cli("ssd_lightning.train", "-m", "hydra/launcher=slurm", "anchors=ssd,tall_skinny")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: hydra/launcher=slurm: the Hydra")


def test_a_base_install_without_any_hydra_plugin_is_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `pip install -e .` alone has no hydra_plugins package at all: looking up a plugin module
    # under it raises instead of returning None
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        if name.split(".")[0] == "hydra_plugins":
            raise ModuleNotFoundError("No module named 'hydra_plugins'", name="hydra_plugins")
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[search\]'"):
        check_plugins(["hparams_search=anchors_optuna"])
