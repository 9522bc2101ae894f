"""Anchor-to-ground-truth matching, batched over images with padded GT tensors."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def match_anchors(
    gt_boxes: Tensor, gt_mask: Tensor, anchors_xyxy: Tensor, iou_threshold: float = 0.5
) -> Tensor:
    """Assign each anchor a GT index, or -1 for background.

    gt_boxes (B, G, 4) xyxy and anchors_xyxy (N, 4) xyxy in the same units (normalized);
    gt_mask (B, G) bool, False for padding. An anchor is positive when its best IoU is
    >= ``iou_threshold``; in addition every real GT's best anchor is forced positive and assigned
    to that GT (a later GT wins an anchor two GTs share, as in torchvision's SSDMatcher).
    Returns matched (B, N) int64.
    """
    B, G, _ = gt_boxes.shape
    N = anchors_xyxy.shape[0]
    iou = box_iou(gt_boxes.reshape(-1, 4), anchors_xyxy).view(B, G, N)
    iou = iou.masked_fill(~gt_mask[:, :, None], -1.0)  # padding never wins
    best_iou, matched = iou.max(dim=1)  # (B, N) best GT per anchor
    matched = torch.where(best_iou >= iou_threshold, matched, -1)
    if G == 0:
        return matched
    # Forced matches: scatter each GT's index onto its best anchor. Padded GTs scatter into an
    # extra dummy column N that is dropped, so no per-image loop or boolean indexing is needed.
    best_anchor = iou.argmax(dim=2)  # (B, G)
    best_anchor = torch.where(gt_mask, best_anchor, N)
    gt_index = torch.arange(G, device=gt_boxes.device).expand(B, G)
    padded = torch.cat([matched, matched.new_full((B, 1), -1)], 1)
    # amax: where two GTs share a best anchor, the later one wins, deterministically on any device
    padded.scatter_reduce_(1, best_anchor, gt_index, reduce="amax", include_self=False)
    return padded[:, :N]
