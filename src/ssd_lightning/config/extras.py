"""The optional dependencies (pip extras) and the one message when one is missing.

``pip install -e .`` stays small; a feature that needs more says which extra brings it:

- ``search``: the Optuna sweeper behind ``hparams_search=<name>`` (``conf/hparams_search/``)
- ``onnx``: ONNX export (onnx, onnxscript) and running ``.onnx`` models (onnxruntime)
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from types import ModuleType

from ssd_lightning.config.errors import MissingDependencyError

# Hydra plugins selected by a command-line override: (override prefix, module, pip package, extra)
_PLUGINS = (
    ("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "search"),
    (
        "hydra/sweeper=optuna",
        "hydra_plugins.hydra_optuna_sweeper",
        "hydra-optuna-sweeper",
        "search",
    ),
    (
        "hydra/launcher=slurm",
        "hydra_plugins.hydra_submitit_launcher",
        "hydra-submitit-launcher",
        "",
    ),
)


def install_hint(package: str, extra: str) -> str:
    return f"pip install -e '.[{extra}]'" if extra else f"pip install {package}"


def require(module: str, package: str, extra: str, feature: str) -> ModuleType:
    """Import an optional dependency, or raise one message naming the package and extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs {package}, which is not installed here ({e.name or module}): "
            f"{install_hint(package, extra)}"
        ) from None


def _find(module: str) -> object | None:
    """``importlib.util.find_spec`` that also says None when the parent package is missing: a
    base install has no ``hydra_plugins`` at all, and looking under it raises."""
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None


def check_plugins(argv: Sequence[str]) -> None:
    """Before Hydra composes: a command line selecting a plugin that is not installed fails with
    one message naming it (Hydra would only say that a config is missing)."""
    for arg in argv:
        override = arg.lstrip("+~")
        for prefix, module, package, extra in _PLUGINS:
            if not override.startswith(prefix) or override == f"{prefix}null":
                continue
            if _find(module) is None:
                raise MissingDependencyError(
                    f"{override}: the Hydra plugin {package} is not installed: "
                    f"{install_hint(package, extra)}"
                )
