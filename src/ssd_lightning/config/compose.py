"""Composing configs outside ``@hydra.main`` and instantiating them with clear errors."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError

import ssd_lightning.config.resolvers  # noqa: F401 - registers the ${ssd_*:} resolvers
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.overrides import quote_paths
from ssd_lightning.config.paths import config_dir

# what a failing constructor of a group usually means
_HINTS = {
    "trainer": " (trainer options: default (auto device), cpu, gpu, ddp, ddp_cpu; gpu and ddp "
    "need GPUs, ddp_cpu simulates 2 processes on the CPU)",
}


# "model.net.head_kernel_size=2: ..." or "data.verify: ...": a message that starts with a key
_NAMES_A_KEY = re.compile(r"^[A-Za-z_][\w]*(\.[\w\[\]]+)+\s*[=:]")


def compose(
    config_name: str = "train",
    overrides: Sequence[str] = (),
    output_dir: str | None = None,
    job_name: str = "compose",
) -> DictConfig:
    """The composed config as ``@hydra.main`` would pass it to a task, without starting a run.

    Hydra's own config is registered (so ``${hydra:...}`` and the runtime choices resolve) and
    then removed from the returned tree; ``output_dir`` replaces ``paths.output_dir`` (the run
    dir, which only exists inside a Hydra run).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=job_name):
        cfg = hydra_compose(config_name, overrides=quote_paths(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
        if output_dir is not None and "paths" in cfg:
            cfg.paths.output_dir = str(output_dir)
    return cfg


def _own_error(e: BaseException) -> BaseException | None:
    """The project's own exception behind a Hydra / OmegaConf wrapper, if that is what it is."""
    inner = e.__cause__ or e.__context__
    if inner is not None and type(inner).__module__.startswith("ssd_lightning."):
        return inner
    return None


def instantiate_checked(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that turns a constructor's ValueError / TypeError into a
    ``ConfigError`` naming the config key, without Hydra's wrapping."""
    try:
        return instantiate(node, **kwargs)
    except InterpolationResolutionError as e:
        own = _own_error(e)  # a resolver's (e.g. ${ssd_coco_classes:} on a missing file)
        if own is not None:
            raise own from None
        raise
    except InstantiationException as e:
        cause = e.__cause__
        if _own_error(e) is not None and not isinstance(cause, ValueError | TypeError):
            raise cause from None  # the project's own error (a data error) names its input
        # Lightning's MisconfigurationException (e.g. trainer=gpu without a GPU) is a config error
        if isinstance(cause, ValueError | TypeError) or (
            type(cause).__name__ == "MisconfigurationException"
        ):
            if isinstance(cause, ConfigError):
                raise cause from None
            hint = _HINTS.get(key.split(".")[0], "")
            message = str(cause)
            if not _NAMES_A_KEY.match(message):  # the constructor's own message names no key
                message = f"{key}: {message}"
            raise ConfigError(f"{message}{hint}") from cause
        raise
