"""Random ground truth and predictions shared by the core tests."""

import torch
from torchvision.ops import box_convert

from ssd_lightning.config.paths import load_option
from ssd_lightning.core.anchors import anchor_pairs, generate_anchors

SIZES_300 = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def anchors_300(preset: str = "tall_skinny"):
    cxcywh = generate_anchors(SIZES_300, anchor_pairs(load_option("anchors", preset)))
    return cxcywh, box_convert(cxcywh, "cxcywh", "xyxy")


def random_gt(counts, gen):
    """Padded GT for per-image counts: boxes (B,G,4) xyxy normalized, labels (B,G), mask (B,G)."""
    B, G = len(counts), max(max(counts), 1)
    boxes = torch.zeros(B, G, 4)
    mask = torch.zeros(B, G, dtype=torch.bool)
    for b, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=gen) * 0.8
        wh = torch.rand(n, 2, generator=gen) * (0.99 - xy) + 0.01
        boxes[b, :n] = torch.cat([xy, xy + wh], 1)
        mask[b, :n] = True
    return boxes, mask.long(), mask
