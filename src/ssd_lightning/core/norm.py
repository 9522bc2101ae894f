"""Normalization layers that train at any batch size."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SafeBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also trains on one value per channel (N*H*W == 1: a batch of one
    image on a 1x1 map), where batch statistics do not exist and ``nn.BatchNorm2d`` raises.

    Such a batch is normalized with the running statistics, as in eval mode, and leaves them
    untouched (one value says nothing about a variance); the affine weight and bias still learn.
    Every other batch behaves exactly as in ``nn.BatchNorm2d``; the state-dict keys are the same.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.numel() == x.shape[1] and self.running_mean is not None:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)
