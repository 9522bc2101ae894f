"""Shared fixtures: compose the Hydra configs in-process, run the CLIs, and one tiny trained run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from ssd_lightning.config.compose import compose

ROOT = Path(__file__).resolve().parents[1]
PENNFUDAN = ROOT / "data" / "PennFudanPed"  # the vendored dataset, its manifest and split
MANIFEST = ROOT / "data" / "pennfudan_manifest.json"
SPLIT = ROOT / "data" / "pennfudan_split.json"

# A CPU run in seconds: 128 px input, 2-image batches, 2 train and 1 val batch per epoch.
TINY = {
    "model.net.weights": "none",
    "model.net.image_size": "128",
    "data.batch_size": "2",
    "data.num_workers": "0",
    "trainer.accelerator": "cpu",
    "trainer.precision": "32-true",  # the same numbers on every CPU (auto: bf16 where native)
    "trainer.max_epochs": "1",
    "trainer.limit_train_batches": "2",
    "trainer.limit_val_batches": "1",
    "trainer.num_sanity_val_steps": "0",
    "trainer.enable_progress_bar": "false",
    "callbacks.prediction_images.every_n_epochs": "1",
    "callbacks.prediction_images.max_images": "2",
    "test_after_fit": "false",  # the whole validation split after the fit: tiny_run alone
}


def tiny(*extra: str, **changes: Any) -> list[str]:
    """TINY as override strings; ``changes`` (dots as __) replace entries, ``extra`` is appended."""
    values = dict(TINY)
    values.update({k.replace("__", "."): str(v) for k, v in changes.items()})
    return [f"{k}={v}" for k, v in values.items()] + list(extra)


def make_cfg(overrides: Sequence[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose like ``@hydra.main`` would (HydraConfig set, so runtime choices are known)."""
    return compose(config_name, overrides, output_dir=str(output_dir), job_name="test")


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    return lambda overrides=(), name="train": make_cfg(overrides, tmp_path / "run", name)


def run_cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repo root, output captured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_LIGHTNING_")}
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one non-empty line a command-line mistake prints on stderr (exit status 2)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-epoch tiny training run (in-process), shared by the train / CLI / TensorBoard tests;
    tagged and evaluated after the fit (the 50 validation images at 128 px: a few seconds)."""
    from ssd_lightning.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    overrides = tiny(
        "tags=[tiny,ci]",
        trainer__max_epochs=2,
        test_after_fit="true",
    )
    metrics = train(make_cfg(overrides, out))
    return {"dir": out, "metrics": metrics}


@pytest.fixture(scope="module")
def one_thread():
    """Per-sample data ops are tiny: intra-op threads only add contention on a 2-core machine
    (DataLoader workers run with one thread too). Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
