"""An exponential moving average (EMA) of the network's weights and BatchNorm statistics.

Trained from scratch on 120 images with strong augmentation, the network's validation mAP swings
by a few points from one evaluation to the next even late in a cosine schedule, when the learning
rate is tiny: BatchNorm's running statistics (momentum 0.1) follow the last few augmented batches.
The average over the last ~1/(1 - decay) optimizer steps is a steadier and usually better network;
it is the one validated, exported and evaluated when ``model.ema_decay`` is set.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used for the update after optimizer step ``step`` (1-based): ``decay``, held
    lower early on, ``(1 + step) / (10 + step)``, so that a short run's average is not dominated
    by the random initial weights (the warm-up of TensorFlow's ExponentialMovingAverage)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA(nn.Module):
    """``net``: a frozen copy of the tracked network, updated by ``update`` after each optimizer
    step: floating-point entries of its state (weights, BatchNorm running statistics) move
    towards the tracked network's by ``1 - decay``; integer ones (BatchNorm's batch counters) are
    copied. Being a submodule of the LightningModule, it follows the device, is saved in
    checkpoints (``ema.net.*``) and restored on resume."""

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        if not (isinstance(decay, float | int) and 0.0 < decay < 1.0):
            raise ValueError(
                f"model.ema_decay={decay!r}: allowed values are null (off) or 0 < x < 1"
            )
        self.decay = float(decay)
        self.net = copy.deepcopy(net).requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int, skipped: Tensor | None = None) -> None:
        """Move the average towards ``net`` (same architecture) after optimizer step ``step``.
        A handful of fused kernels, no host sync. ``skipped``: () float on the device, 1.0 when
        the step was skipped (non-finite): the average then stays as it was, like the weights."""
        state = net.state_dict()
        floats: tuple[list[Tensor], list[Tensor]] = ([], [])
        ints: tuple[list[Tensor], list[Tensor]] = ([], [])
        for k, v in self.net.state_dict().items():
            pair = floats if v.is_floating_point() else ints
            pair[0].append(v)
            pair[1].append(state[k])
        weight = 1.0 - ema_decay_at(self.decay, step)
        if skipped is None:
            torch._foreach_lerp_(*floats, weight)
        elif skipped.device.type == "cpu":  # reading the flag costs nothing here: one lerp
            torch._foreach_lerp_(*floats, weight * (1.0 - float(skipped)))
        else:
            masked_lerp_(*floats, weight, skipped)
        if ints[0]:
            torch._foreach_copy_(*ints)


def masked_lerp_(avg: list[Tensor], new: list[Tensor], weight: float, skipped: Tensor) -> None:
    """``avg += weight (new - avg)`` in place, or nothing where ``skipped`` (() float, 1.0 or 0.0,
    on the device) is 1: decided by the arithmetic, without reading the flag on the host (a sync
    on a GPU), at the price of two more kernels than a lerp."""
    diffs = torch._foreach_sub(new, avg)
    torch._foreach_mul_(diffs, (1.0 - skipped) * weight)
    torch._foreach_add_(avg, diffs)
