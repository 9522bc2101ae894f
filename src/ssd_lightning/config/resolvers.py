"""The ``${ssd_*:...}`` resolvers the YAML configs use. Registered on import of this module,
which every entry point and ``compose`` import first.

- ``${ssd_root:}``                    the project root (``config.paths.project_root``)
- ``${ssd_monitor:<val_size>}``       the best-checkpoint metric: val/map, or train/loss
                                      without a validation split (the original recipe)
- ``${ssd_monitor_mode:<val_size>}``  max for val/map, min for train/loss
- ``${ssd_precision:<accelerator>}``  bf16-mixed where the device computes bf16 natively (a GPU
                                     with bf16, a CPU with AMX / AVX512-BF16), else 32-true
- ``${ssd_options:<group>}``          the options of a config group (for the --help texts)
- ``${ssd_coco_classes:<train_json>}`` K + 1 for the K classes of a COCO file (its categories
                                      but a placeholder): the data's ``num_classes``, which
                                      ``model.net.num_classes`` follows
- ``${ssd_val_every:<max_epochs>,<n>}`` the trainer's ``check_val_every_n_epoch`` for about ``n``
                                      validations a run
- ``${ssd_sampler_seed:<storage>,<seed>}`` an Optuna search's sampler seed: ``seed`` in memory,
                                      none for a stored study (each continuation draws anew)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ssd_lightning.config.paths import available_options, project_root


def _has_validation(val_size: Any) -> bool:
    # a count (Penn-Fudan, COCO) or a fraction (COCO's split); unset counts as validation
    try:
        return float(val_size) > 0
    except (TypeError, ValueError):
        return True


def monitor(val_size: Any) -> str:
    # COCO's main metric (mAP over IoU 0.5-0.95): exporting by val/map_50 picked models whose
    # boxes were looser (up to 0.04 less map at the same map_50; README, Accuracy)
    return "val/map" if _has_validation(val_size) else "train/loss"


def monitor_mode(val_size: Any) -> str:
    return "max" if _has_validation(val_size) else "min"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AMX or AVX512-BF16; Linux's /proc/cpuinfo flags).
    Elsewhere bf16 is emulated and slower than fp32, so the answer is no."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_precision(accelerator: Any = "auto") -> str:
    """bf16-mixed where the run's device computes bf16 natively (the fast path: a GPU with bf16,
    ~2.8x a fp32 training step on a CPU with AMX), else 32-true."""
    accelerator = str(accelerator)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return "bf16-mixed" if on_cpu and cpu_has_native_bf16() else "32-true"


def validation_interval(max_epochs: Any, validations: Any = 32) -> int:
    """Validate about ``validations`` times a run, always in the last epoch: every epoch for runs
    of fewer than 2 x ``validations`` epochs (or without ``max_epochs``), else every d epochs,
    d the largest divisor of ``max_epochs`` up to ``max_epochs / validations`` (320 epochs, 32:
    every 10). A validation costs about a quarter of a training epoch on Penn-Fudan on a CPU."""
    try:
        epochs, wanted = int(max_epochs), int(validations)
    except (TypeError, ValueError):
        return 1
    if epochs < 1 or wanted < 1:
        return 1
    most = max(1, epochs // wanted)
    return max(d for d in range(1, most + 1) if epochs % d == 0)


def coco_classes(train_json: Any) -> int:
    # imported on use: reading a dataset is the data package's job, and only data=coco asks
    from ssd_lightning.data.coco import coco_num_classes

    return coco_num_classes(str(train_json))


def sampler_seed(storage: Any, seed: Any) -> Any:
    # an in-memory search is reproducible; a stored study continued in a new process with the
    # same seed would draw the points it has already tried again
    return seed if storage is None else None


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("ssd_root", lambda: str(project_root()), replace=True)
    OmegaConf.register_new_resolver("ssd_monitor", monitor, replace=True)
    OmegaConf.register_new_resolver("ssd_monitor_mode", monitor_mode, replace=True)
    OmegaConf.register_new_resolver("ssd_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("ssd_coco_classes", coco_classes, replace=True)
    OmegaConf.register_new_resolver("ssd_val_every", validation_interval, replace=True)
    OmegaConf.register_new_resolver("ssd_sampler_seed", sampler_seed, replace=True)
    OmegaConf.register_new_resolver(
        "ssd_options", lambda group: ", ".join(available_options(group)), replace=True
    )


register_resolvers()
