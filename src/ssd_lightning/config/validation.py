"""Cross-field checks of a composed train / evaluate config, before anything heavy is built.

Each constructor checks its own values (``SSD``, ``MultiBoxLoss``, ``SSDLitModule``, the
DataModule, the transforms) and names its config key; ``compose.instantiate_checked`` turns those
errors into ``ConfigError``. What no single constructor can see is checked here: the anchor
preset against the backbone's feature maps, the data's image size against the network's, the
optimizer's values (its constructor only runs inside the fit), a schedule's need for a run
length, and the checkpoint to resume from.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.paths import available_options
from ssd_lightning.core.anchors import anchor_pairs
from ssd_lightning.core.backbone import NUM_FEATURE_MAPS
from ssd_lightning.core.plain import is_int, is_number
from ssd_lightning.core.ssd import net_int_error


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _anchor_errors(cfg: DictConfig) -> list[str]:
    anchors = _get(cfg, "anchors")
    if anchors is None:
        return ["anchors: missing; select a preset with anchors=<name>"]
    plain = (
        OmegaConf.to_container(anchors, resolve=True) if OmegaConf.is_config(anchors) else anchors
    )
    name = plain.get("name", "?") if isinstance(plain, Mapping) else "?"
    presets = ", ".join(available_options("anchors"))
    where = f"(preset {name}, conf/anchors/{name}.yaml; presets: {presets})"
    if not isinstance(plain, Mapping):
        return [f"anchors: expected a preset mapping, got {plain!r} {where}"]
    try:
        pairs = anchor_pairs(plain)
    except (ValueError, TypeError) as e:
        return [f"{e} {where}"]
    n = NUM_FEATURE_MAPS
    if len(pairs) != n:
        return [
            f"anchors: the preset describes {len(pairs)} feature maps but the ResNet-34 SSD has "
            f"{n}: give anchors.scales {n + 1} values with extra_square=true ({n} without), or "
            f"{n} per-map lists in anchors.ratios / anchors.pairs {where}"
        ]
    return []


def _optimizer_errors(cfg: DictConfig) -> list[str]:
    node = _get(cfg, "model.optimizer")
    if node is None:
        return []
    # a string where a number goes: torch's own complaint ("'<=' not supported between ...")
    # names no key
    wrong = [
        f"optimizer.{key}={node.get(key)!r}: allowed values are numbers"
        for key in ("lr", "weight_decay", "eps", "momentum")
        if node.get(key) is not None and not is_number(node.get(key), finite=False)
    ]
    if wrong:
        return wrong
    try:  # the optimizer checks its own values (lr, betas, ...); ask it now, on a dummy parameter
        instantiate(node)(params=[torch.zeros(1, requires_grad=True)])
    except Exception as e:  # noqa: BLE001 - whatever the constructor rejects is a config error
        return [f"optimizer: {e}"]
    clip, precision = _get(cfg, "trainer.gradient_clip_val"), str(_get(cfg, "trainer.precision"))
    mixed = "mixed" in precision or precision in ("16", "bf16")
    if clip and mixed and _get(cfg, "model.optimizer.fused"):
        # Lightning's mixed-precision plugin refuses to clip what a fused optimizer unscales
        return [
            f"trainer.gradient_clip_val={clip} with optimizer.fused=true under "
            f"trainer.precision={precision}: Lightning cannot clip the gradients of a fused "
            "optimizer in mixed precision; set optimizer.fused=false (one host sync per step) "
            "or trainer.gradient_clip_val=null"
        ]
    return []


def takes_total_steps(factory: Callable[..., Any]) -> bool:
    """Whether a scheduler factory (a partial or a function) needs the fit's ``total_steps``: such
    a schedule is spread over the whole run, so the run must have a known length. The module
    passes it (``SSDLitModule.configure_optimizers``); this module checks the run has one."""
    return "total_steps" in inspect.signature(factory).parameters


def _scheduler_errors(cfg: DictConfig) -> list[str]:
    """A schedule over the whole fit (warm-up + cosine) needs to know the fit's length."""
    target = _get(cfg, "model.scheduler._target_")
    if target is None:
        return []
    try:
        takes_total = takes_total_steps(get_method(target))
    except (ImportError, ValueError, TypeError):
        return []  # a target that cannot be resolved is reported when it is instantiated
    max_epochs, max_steps = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_steps")
    by_epoch = _get(cfg, "model.scheduler_interval") == "epoch"  # its length: max_epochs alone
    if takes_total and max_epochs == -1 and (by_epoch or max_steps in (None, -1)):
        return [
            f"trainer.max_epochs=-1 with scheduler {target}: the schedule spans the whole fit and "
            "an open-ended run has no length; give trainer.max_epochs (or trainer.max_steps), or "
            "use scheduler=none (a constant lr)"
        ]
    return []


def _int_errors(cfg: DictConfig) -> list[str]:
    """Integers read before any constructor checks them: the seed (``int(seed)``), the run's
    length (Lightning compares it deep inside the fit)."""
    errors = []
    for key, low in (("seed", 0), ("trainer.max_epochs", -1), ("trainer.max_steps", -1)):
        value = _get(cfg, key)
        if value is not None and not is_int(value, low):
            errors.append(f"{key}={value!r}: allowed values are integers >= {low} (or null)")
    return errors


def flag(cfg: DictConfig, key: str, default: bool = False) -> bool:
    """A true / false key (absent: ``default``), checked before any work so a typo such as
    ``no`` or ``maybe`` fails at once instead of reading as true."""
    value = OmegaConf.select(cfg, key, default=default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: true or false, got {value!r}")
    return value


def never_validates(cfg: DictConfig, by_interval: bool = True) -> str | None:
    """The setting under which a training run with a validation split never validates (so no
    val/ metric is ever logged), as ``key=value``; None when it validates. ``by_interval``: also
    a validation interval longer than the run (which a resume with more epochs may reach)."""
    limit = _get(cfg, "trainer.limit_val_batches")
    if limit is not None and is_number(limit) and limit == 0:
        return f"trainer.limit_val_batches={limit}"
    if not by_interval:
        return None
    every, epochs = _get(cfg, "trainer.check_val_every_n_epoch"), _get(cfg, "trainer.max_epochs")
    steps = _get(cfg, "trainer.max_steps")
    if is_int(every, 1) and is_int(epochs, 1) and steps in (None, -1) and every > epochs:
        return f"trainer.check_val_every_n_epoch={every} with trainer.max_epochs={epochs}"
    return None


def _validation_errors(cfg: DictConfig) -> list[str]:
    """A best model chosen by a val/ metric needs validations (caught now, not after the first
    epoch's training)."""
    monitor = _get(cfg, "callbacks.model_checkpoint.monitor")
    setting = never_validates(cfg, by_interval=False)  # a run may stop and resume for more
    if not (isinstance(monitor, str) and monitor.startswith("val/") and setting):
        return []
    return [
        f"{setting}: the run never validates, but callbacks.model_checkpoint.monitor={monitor} "
        "chooses the best model by validation; let it validate, or train without a validation "
        "split (data.val_size=0: the best model by train/loss)"
    ]


def validate_config(cfg: DictConfig) -> None:
    """Check a composed train / evaluate config; raise ``ConfigError`` listing every problem (one
    line for one problem, one line each under a header for several)."""
    errors: list[str] = _int_errors(cfg)
    if _get(cfg, "model.net") is not None:
        errors += _anchor_errors(cfg)
    errors += _optimizer_errors(cfg)
    errors += _scheduler_errors(cfg)
    errors += _validation_errors(cfg)
    data_size, net_size = _get(cfg, "data.image_size"), _get(cfg, "model.net.image_size")
    size_error = net_int_error("image_size", net_size) if net_size is not None else None
    if size_error:  # the size typed, named as typed (data.image_size follows it)
        errors.append(size_error)
    elif data_size is not None and net_size is not None and data_size != net_size:
        errors.append(
            f"data.image_size={data_size} but model.net.image_size={net_size}: the images must be "
            "resized to the network input; set both (data.image_size follows model.net.image_size "
            "by default)"
        )
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).expanduser().is_file():
        errors.append(
            f"ckpt_path={ckpt}: no such file (give a .ckpt written by a training run, "
            "e.g. outputs/<date>/<time>/checkpoints/last.ckpt)"
        )
    if len(errors) == 1:  # one mistake, one line
        raise ConfigError(f"invalid configuration: {errors[0]}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
