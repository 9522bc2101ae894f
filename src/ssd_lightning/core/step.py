"""One forward pass with its loss: what a training or validation step computes.

Shared by the LightningModule and the benchmark, so the benchmark times the real step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssd_lightning.core.loss import LossOutput, MultiBoxLoss
from ssd_lightning.core.ssd import SSD


def forward_with_loss(
    net: SSD,
    criterion: MultiBoxLoss,
    images: Tensor,
    boxes: Tensor,
    labels: Tensor,
    mask: Tensor,
) -> tuple[Tensor, Tensor, LossOutput]:
    """images (B,3,S,S) in [0,1], square; boxes (B,G,4) xyxy in network-input pixels [0,S],
    labels (B,G) int64, mask (B,G) bool -> (loc (B,N,4), logits (B,N,C), the loss)."""
    if images.is_cuda:  # NHWC convolutions run faster on tensor cores
        images = images.contiguous(memory_format=torch.channels_last)
    loc, logits = net(images)
    gt = boxes / images.shape[-1]  # (B,G,4) xyxy, input pixels -> [0,1]
    out = criterion(loc, logits, gt, labels, mask, net.anchors_cxcywh, net.anchors_xyxy)
    return loc, logits, out
