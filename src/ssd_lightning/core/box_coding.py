"""SSD box encoding: anchor-relative offsets scaled by the variances (sigma_xy, sigma_wh).

``t_xy = (b_xy - a_xy) / (sigma_xy * a_wh)``, ``t_wh = log(b_wh / a_wh) / sigma_wh``. This equals
torchvision's ``BoxCoder`` with weights ``(1/sigma_xy, 1/sigma_xy, 1/sigma_wh, 1/sigma_wh)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VARIANCES = (0.1, 0.2)
# exp() guard, as torchvision: no predicted box grows more than 1000/16 times its anchor.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def encode(boxes: Tensor, anchors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """boxes (..., N, 4) cxcywh, anchors (N, 4) cxcywh, same units -> offsets (..., N, 4)."""
    txy = (boxes[..., :2] - anchors[..., :2]) / (variances[0] * anchors[..., 2:])
    # clamp keeps degenerate (zero-size) boxes finite instead of -inf
    twh = torch.log(boxes[..., 2:].clamp(min=1e-8) / anchors[..., 2:]) / variances[1]
    return torch.cat([txy, twh], -1)


def decode(offsets: Tensor, anchors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """offsets (..., N, 4), anchors (N, 4) cxcywh -> boxes (..., N, 4) cxcywh, anchors' units."""
    xy = anchors[..., :2] + offsets[..., :2] * variances[0] * anchors[..., 2:]
    wh = anchors[..., 2:] * torch.exp((offsets[..., 2:] * variances[1]).clamp(max=_MAX_LOG_SCALE))
    return torch.cat([xy, wh], -1)
