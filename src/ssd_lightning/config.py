"""Where the configs live, the Hydra resolvers they use, and start-up validation.

The Hydra configs live in ``conf/`` at the repo root. An editable install (``pip install -e .``)
finds it from this file's location. To use another config tree, either

* set ``SSD_LIGHTNING_CONF_DIR=/path/to/conf`` (replaces the primary config dir; it must hold a
  ``train.yaml`` and the groups it selects), or
* pass Hydra's ``--config-dir /path/to/extra`` (adds a dir searched first: drop e.g. an
  ``anchors/my_preset.yaml`` there and select it with ``anchors=my_preset``).

``SSD_LIGHTNING_ROOT`` overrides the project root used for ``paths.root_dir`` (data and outputs).

``validate_config`` checks a composed config before anything heavy is built, and raises
``ConfigError`` with messages that name the config key, the bad value and the allowed values.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf

from ssd_lightning.core.backbone import WEIGHT_NAMES

CONF_DIR_ENV = "SSD_LIGHTNING_CONF_DIR"  # the same variable core.anchors reads
ROOT_ENV = "SSD_LIGHTNING_ROOT"
# ResNet-34 layer2..4 + extras C5..C7; the backbone derives their sizes, their count is the design.
NUM_FEATURE_MAPS = 6


T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


def project_root() -> Path:
    """The repo root: ``$SSD_LIGHTNING_ROOT``, else the checkout this (editable) package lives in,
    else the current directory."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2]  # src/ssd_lightning/config.py -> repo root
    if (here / "conf").is_dir():
        return here
    return Path.cwd()


def config_dir() -> Path:
    """The primary config dir: ``$SSD_LIGHTNING_CONF_DIR``, else ``<repo root>/conf``."""
    env = os.environ.get(CONF_DIR_ENV)
    path = Path(env).expanduser().resolve() if env else project_root() / "conf"
    if not (path / "train.yaml").is_file():
        where = f"{CONF_DIR_ENV}={env}" if env else f"the repo's conf/ ({path})"
        raise ConfigError(
            f"no train.yaml in {where}. Install the package editable from the repo "
            f"(pip install -e .) or set {CONF_DIR_ENV} to a config dir holding train.yaml."
        )
    return path


def _monitor(val_size: Any) -> str:
    # Without a validation split (the original recipe) the best checkpoint is the lowest train loss.
    return "val/map_50" if _as_int(val_size, 1) > 0 else "train/loss"


def _monitor_mode(val_size: Any) -> str:
    return "max" if _as_int(val_size, 1) > 0 else "min"


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def auto_precision(accelerator: Any = "auto") -> str:
    """bf16-mixed where the run will use a GPU that supports it (the fast path), else 32-true."""
    import torch

    on_gpu = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def register_resolvers() -> None:
    """``${ssd_root:}``, ``${ssd_monitor:<val_size>}``, ``${ssd_monitor_mode:<val_size>}``,
    ``${ssd_precision:<accelerator>}``."""
    OmegaConf.register_new_resolver("ssd_root", lambda: str(project_root()), replace=True)
    OmegaConf.register_new_resolver("ssd_monitor", _monitor, replace=True)
    OmegaConf.register_new_resolver("ssd_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("ssd_monitor_mode", _monitor_mode, replace=True)


register_resolvers()


# --------------------------------------------------------------------------------------------------
# validation


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(errors: list[str], cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str,
           required: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and not required:
        return
    try:
        good = ok(value)
    except Exception:  # a wrong type is a wrong value
        good = False
    if not good:
        errors.append(f"{key}={value!r}: allowed values are {allowed}")


def _anchor_errors(cfg: DictConfig) -> list[str]:
    from ssd_lightning.core.anchors import anchor_pairs, available_presets

    anchors = _get(cfg, "anchors")
    if anchors is None:
        return ["anchors: missing; select a preset with anchors=<name>"]
    plain = anchors
    if OmegaConf.is_config(anchors):
        plain = OmegaConf.to_container(anchors, resolve=True)
    name = plain.get("name", "?") if isinstance(plain, Mapping) else "?"
    try:
        presets = ", ".join(available_presets(config_dir()))
    except ConfigError:
        presets = "see conf/anchors/"
    where = f"(preset {name}, conf/anchors/{name}.yaml; presets: {presets})"
    if not isinstance(plain, Mapping):
        return [f"anchors: expected a preset mapping, got {plain!r} {where}"]
    try:
        pairs = anchor_pairs(plain)
    except (ValueError, TypeError) as e:
        return [f"{e} {where}"]
    if len(pairs) != NUM_FEATURE_MAPS:
        return [
            f"anchors: the preset describes {len(pairs)} feature maps but the ResNet-34 SSD has "
            f"{NUM_FEATURE_MAPS}: give anchors.scales {NUM_FEATURE_MAPS + 1} values with "
            f"extra_square=true ({NUM_FEATURE_MAPS} without), or {NUM_FEATURE_MAPS} per-map lists "
            f"in anchors.ratios / anchors.pairs {where}"
        ]
    return []


def validate_config(cfg: DictConfig) -> None:
    """Check a composed train/evaluate config; raise ``ConfigError`` listing every problem."""
    errors: list[str] = []
    if _get(cfg, "model.net") is not None:
        errors += _anchor_errors(cfg)
        _check(errors, cfg, "model.net.num_classes", lambda v: isinstance(v, int) and v >= 2,
               "an integer >= 2 (background + classes)")
        _check(errors, cfg, "model.net.image_size", lambda v: isinstance(v, int) and v >= 64,
               "an integer >= 64 (300 is the design)")
        _check(errors, cfg, "model.net.head_kernel_size", lambda v: v in (1, 3), "1 or 3")
        _check(errors, cfg, "model.net.weights",
               lambda v: str(v) in WEIGHT_NAMES or Path(str(v)).expanduser().is_file(),
               "auto, imagenet, none or the path of an existing ResNet-34 state dict")
    for group in ("predict", "evaluate"):
        _check(errors, cfg, f"model.{group}.score_threshold", lambda v: _number(v) and 0 <= v <= 1,
               "a number in [0, 1]")
        _check(errors, cfg, f"model.{group}.nms_threshold", lambda v: _number(v) and 0 < v <= 1,
               "a number in (0, 1]")
        _check(errors, cfg, f"model.{group}.top_k", lambda v: isinstance(v, int) and v >= 1,
               "an integer >= 1")
    _check(errors, cfg, "model.loss.neg_ratio", lambda v: _number(v) and v > 0, "a number > 0")
    _check(errors, cfg, "model.loss.beta", lambda v: _number(v) and v > 0, "a number > 0")
    _check(errors, cfg, "model.loss.iou_threshold", lambda v: _number(v) and 0 < v <= 1,
           "a number in (0, 1]")
    _check(errors, cfg, "model.max_nonfinite_steps", lambda v: isinstance(v, int) and v >= 1,
           "an integer >= 1")
    _check(errors, cfg, "optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0")
    _check(errors, cfg, "data.batch_size", lambda v: isinstance(v, int) and v >= 1,
           "an integer >= 1")
    _check(errors, cfg, "data.num_workers", lambda v: isinstance(v, int) and v >= 0,
           "an integer >= 0")
    _check(errors, cfg, "data.val_size", lambda v: isinstance(v, int) and v >= 0,
           "an integer >= 0 (0 = no validation split: every image trains)")
    _check(errors, cfg, "trainer.max_epochs", lambda v: isinstance(v, int) and (v >= 1 or v == -1),
           "an integer >= 1 (or -1 for no limit)")
    interval = _get(cfg, "scheduler.interval")
    if interval is not None and interval not in ("step", "epoch"):
        errors.append(f"scheduler.interval={interval!r}: allowed values are step, epoch")
    data_size = _get(cfg, "data.image_size")
    net_size = _get(cfg, "model.net.image_size")
    if data_size is not None and net_size is not None and data_size != net_size:
        errors.append(
            f"data.image_size={data_size} but model.net.image_size={net_size}: the images must be "
            "resized to the network input; set both (data.image_size follows model.net.image_size "
            "by default)"
        )
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).expanduser().is_file():
        errors.append(f"ckpt_path={ckpt}: no such file (give a .ckpt written by a training run, "
                      "e.g. outputs/<date>/<time>/checkpoints/last.ckpt)")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


_HINTS = {
    "trainer": " (trainer options: default (auto device), cpu, gpu, ddp, ddp_cpu; gpu and ddp "
               "need GPUs, ddp_cpu simulates 2 processes on the CPU)",
}


def instantiate_checked(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that turns a constructor's ValueError into a ``ConfigError``
    naming the config key, without Hydra's wrapping."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        # Lightning's MisconfigurationException (e.g. trainer=gpu without a GPU) is a config error
        if isinstance(cause, ValueError | TypeError) or (
                type(cause).__name__ == "MisconfigurationException"):
            hint = _HINTS.get(key.split(".")[0], "")
            raise ConfigError(f"{key}: {cause}{hint}") from cause
        raise


# --------------------------------------------------------------------------------------------------
# command-line entry points


def route_library_logs() -> None:
    """Send Lightning's messages and Python warnings through Hydra's logging (console +
    <run dir>/<task>.log), once each; hide one deprecation warning Lightning itself triggers
    with recent torch."""
    import lightning  # noqa: F401 - its import installs the handlers removed here

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.captureWarnings(True)  # warnings (e.g. random-init weights) land in the run's log too


def exit_with_error(error: BaseException, kind: str = "Config error") -> NoReturn:
    """A user mistake ends a command-line tool with one clear message and exit status 2."""
    logging.getLogger("ssd_lightning").error("%s", error)
    print(f"\n{kind}: {error}", file=sys.stderr)
    sys.exit(2)


def run_task(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run a tool's task under Hydra: library logs routed once, user mistakes (config, data, a
    missing required value) end in one clear message and exit status 2, not a traceback."""
    from omegaconf.errors import MissingMandatoryValue

    from ssd_lightning.data.dataset import DatasetReadError
    from ssd_lightning.data.download import DownloadError
    from ssd_lightning.data.manifest import DatasetIntegrityError

    route_library_logs()
    try:
        return task(cfg)
    except (ConfigError, MissingMandatoryValue) as e:
        exit_with_error(e)
    except (DatasetIntegrityError, DatasetReadError, DownloadError) as e:
        exit_with_error(e, "Data error")


def config_path_or_exit() -> str:
    """``config_dir()`` for ``hydra.main``; a missing conf/ is a one-line error."""
    try:
        return str(config_dir())
    except ConfigError as e:
        exit_with_error(e)
