"""Per-map convolutional prediction heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class SSDHeads(nn.Module):
    """Six maps (B, C_in, h_k, w_k) -> loc (B, N, 4) offsets and logits (B, N, num_classes).

    N = sum_k h_k * w_k * A_k, flattened in (map, row, column, anchor) order to match the anchors.
    """

    def __init__(
        self,
        anchors_per_location: Sequence[int],
        num_classes: int,
        in_channels: int = 256,
        kernel_size: int = 1,
    ):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"model.net.head_kernel_size={kernel_size}: allowed values are 1 or 3")
        pad = kernel_size // 2
        self.num_classes = num_classes
        self.box = nn.ModuleList(
            nn.Conv2d(in_channels, 4 * a, kernel_size, padding=pad) for a in anchors_per_location
        )
        self.cls = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes * a, kernel_size, padding=pad)
            for a in anchors_per_location
        )
        for m in [*self.box, *self.cls]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def _flatten(x: Tensor, k: int) -> Tensor:
        # (B, A*k, h, w) -> (B, h*w*A, k)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k)

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        loc = torch.cat([self._flatten(h(m), 4) for h, m in zip(self.box, maps, strict=True)], 1)
        logits = torch.cat(
            [self._flatten(h(m), self.num_classes) for h, m in zip(self.cls, maps, strict=True)], 1
        )
        return loc, logits
