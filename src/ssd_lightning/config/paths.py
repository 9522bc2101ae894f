"""The project root and the config dir: the one place that finds them.

The Hydra configs live in ``conf/`` at the repo root; an editable install (``pip install -e .``)
finds it from this file's location. To use another config tree, either

* set ``SSD_LIGHTNING_CONF_DIR=/path/to/conf`` (replaces the primary config dir; it must hold a
  ``train.yaml`` and the groups it selects), or
* pass Hydra's ``--config-dir /path/to/extra`` (adds a dir searched first: drop e.g. an
  ``anchors/my_preset.yaml`` there and select it with ``anchors=my_preset``).

``SSD_LIGHTNING_ROOT`` moves the project root: ``paths.root_dir`` (data and outputs) and the
default ``conf/`` under it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ssd_lightning.config.errors import ConfigError

CONF_DIR_ENV = "SSD_LIGHTNING_CONF_DIR"
ROOT_ENV = "SSD_LIGHTNING_ROOT"
_CHECKOUT = Path(__file__).resolve().parents[3]  # src/ssd_lightning/config/paths.py -> repo root


def project_root() -> Path:
    """``$SSD_LIGHTNING_ROOT``, else the checkout this (editable) package lives in, else the
    current directory."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if (_CHECKOUT / "conf").is_dir():
        return _CHECKOUT
    return Path.cwd()


def config_dir() -> Path:
    """The primary config dir: ``$SSD_LIGHTNING_CONF_DIR``, else ``<project root>/conf``, else
    the checkout's ``conf/`` (a root moved elsewhere for data and outputs keeps the configs)."""
    env = os.environ.get(CONF_DIR_ENV)
    if env:
        path = Path(env).expanduser().resolve()
    else:
        path = project_root() / "conf"
        if not (path / "train.yaml").is_file():
            path = _CHECKOUT / "conf"
    if not (path / "train.yaml").is_file():
        where = f"{CONF_DIR_ENV}={env}" if env else f"the repo's conf/ ({path})"
        raise ConfigError(
            f"no train.yaml in {where}. Install the package editable from the repo "
            f"(pip install -e .) or set {CONF_DIR_ENV} to a config dir holding train.yaml."
        )
    return path


def data_dir() -> Path:
    """``<project root>/data``: the vendored dataset, its manifest and split."""
    return project_root() / "data"


def available_options(group: str) -> list[str]:
    """The options of a config group, e.g. ``available_options("anchors")``."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def load_option(group: str, name: str) -> dict:
    """``conf/<group>/<name>.yaml`` as a plain dict (e.g. an anchor or augmentation preset)."""
    path = config_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{group}={name}: no file {path}; available: {', '.join(available_options(group))}"
        )
    with path.open() as f:
        return yaml.safe_load(f) or {}
