"""Learning-rate schedules, built as Hydra partials (``conf/scheduler/*.yaml``).

The module calls the partial with the optimizer and, when it takes one, ``total_steps``: the
number of optimizer steps of the whole fit.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    warmup_start_factor: float = 0.01,
    min_lr_ratio: float = 0.01,
) -> LambdaLR:
    """Linear warm-up from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_fraction`` of the
    steps, then cosine decay to ``min_lr_ratio * lr``."""
    for key, value in (
        ("warmup_fraction", warmup_fraction),
        ("warmup_start_factor", warmup_start_factor),
        ("min_lr_ratio", min_lr_ratio),
    ):
        if not 0 <= value <= 1:
            raise ValueError(f"scheduler.{key}={value!r}: allowed values are numbers in [0, 1]")
    total = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return warmup_start_factor + (1 - warmup_start_factor) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
