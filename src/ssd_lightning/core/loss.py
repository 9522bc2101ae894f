"""The SSD MultiBox loss: a box loss on positives + cross-entropy with hard-negative mining.

The box loss is the design's smooth-L1 on the encoded offsets, or an IoU loss (GIoU, DIoU,
torchvision.ops) on the decoded boxes, which scores a box the way the COCO mAP does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, distance_box_iou_loss, generalized_box_iou_loss

from ssd_lightning.core.box_coding import VARIANCES, decode, encode
from ssd_lightning.core.matching import match_anchors
from ssd_lightning.core.plain import is_number

# box loss name -> loss of (pred, target) xyxy boxes, elementwise; smooth_l1 works on offsets
IOU_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss}
BOX_LOSSES = ("smooth_l1", *IOU_LOSSES)
# box_weight=None: the weight that gives each loss about smooth-L1's gradient at a typical
# trained offset error (see MultiBoxLoss)
DEFAULT_BOX_WEIGHTS = {"smooth_l1": 1.0, "giou": 5.0, "diou": 5.0}


@dataclass
class LossOutput:
    total: Tensor  # () box + cls, the value to backpropagate
    box: Tensor  # () box_weight x box loss summed over positives / total positives
    cls: Tensor  # () cross-entropy over positives and mined negatives / total positives
    num_pos: Tensor  # (B,) positive anchors per image
    num_neg: Tensor  # (B,) mined negative anchors per image
    accuracy: Tensor  # () class accuracy over the anchors in the loss (positives + mined negatives)
    box_mae: Tensor  # () mean |offset error| over positive anchors, in encoded units


class MultiBoxLoss(nn.Module):
    """Batched SSD loss.

    Per image, the k = min(neg_ratio * num_pos, num_neg) background anchors with the highest
    cross-entropy are mined (ranked with a sort over the whole batch, no per-image loop). An image
    without GT mines ``neg_ratio`` negatives as if it had one positive: it still teaches the class
    head what background looks like, and its loss stays finite. Both parts are divided by the
    number of positives in the batch (at least 1).

    ``box_loss``: ``smooth_l1`` (the design: smooth-L1 with ``beta`` on the variance-scaled
    offsets, summed over the 4 coordinates) or ``giou`` / ``diou`` (1 - GIoU / DIoU of the
    decoded box and its GT, per positive). ``box_weight`` scales it against the class loss;
    None picks 1 for smooth-L1 and 5 for the IoU losses: at an offset error of ~0.17 per
    coordinate (a trained model's) their gradient is ~0.18x smooth-L1's on offsets scaled by
    the variances (0.1, 0.2); YOLOX weighs its IoU loss 5x as well.
    """

    def __init__(
        self,
        neg_ratio: float = 4.0,
        beta: float = 0.1,
        iou_threshold: float = 0.5,
        variances: tuple[float, float] = VARIANCES,
        box_loss: str = "smooth_l1",
        box_weight: float | None = None,
    ):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(
                f"model.loss.box_loss={box_loss!r}: allowed values are {', '.join(BOX_LOSSES)}"
            )
        if box_weight is None:
            box_weight = DEFAULT_BOX_WEIGHTS[box_loss]
        for key, value, ok, allowed in (
            ("neg_ratio", neg_ratio, lambda v: v > 0, "a number > 0"),
            ("beta", beta, lambda v: v > 0, "a number > 0"),
            ("iou_threshold", iou_threshold, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("box_weight", box_weight, lambda v: v > 0, "a number > 0 or null"),
        ):
            if not (is_number(value) and ok(value)):
                raise ValueError(f"model.loss.{key}={value!r}: allowed values are {allowed}")
        self.neg_ratio = neg_ratio
        self.beta = beta
        self.iou_threshold = iou_threshold
        self.variances = tuple(variances)
        self.box_loss = box_loss
        self.box_weight = box_weight

    @property
    def config(self) -> dict[str, float | str]:
        """The constructor arguments (but the variances, which belong to the box coding): stored
        with a trained model so that its val/loss can be computed again as the run did."""
        keys = ("neg_ratio", "beta", "iou_threshold", "box_loss", "box_weight")
        return {k: getattr(self, k) for k in keys}

    def forward(
        self,
        loc: Tensor,
        logits: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        anchors_cxcywh: Tensor,
        anchors_xyxy: Tensor,
    ) -> LossOutput:
        """loc (B,N,4), logits (B,N,C); gt_boxes (B,G,4) xyxy normalized, gt_labels (B,G) int64,
        gt_mask (B,G) bool; anchors (N,4) normalized, center and corner form."""
        loc, logits = loc.float(), logits.float()  # the loss in fp32 even under autocast
        B, N, C = logits.shape
        matched = match_anchors(gt_boxes, gt_mask, anchors_xyxy, self.iou_threshold)  # (B, N)
        pos = matched >= 0
        idx = matched.clamp(min=0)
        gt_for_anchor = gt_boxes.gather(1, idx[..., None].expand(B, N, 4))  # (B, N, 4) xyxy
        target_loc = encode(
            box_convert(gt_for_anchor, "xyxy", "cxcywh"), anchors_cxcywh, self.variances
        )
        # targets of background anchors are meaningless (possibly padding); zero them, masked below
        target_loc = torch.where(pos[..., None], target_loc, 0.0)
        target_cls = torch.where(pos, gt_labels.gather(1, idx), 0)  # (B, N)

        if self.box_loss == "smooth_l1":
            box_err = F.smooth_l1_loss(loc, target_loc, beta=self.beta, reduction="none").sum(-1)
        else:
            pred = box_convert(decode(loc, anchors_cxcywh, self.variances), "cxcywh", "xyxy")
            # over every anchor, masked below (selecting the positives would sync with the host);
            # background anchors get their own anchor as target: a padding GT (zero size) would
            # put NaN into the loss or its gradient, which masking cannot take out again
            target = torch.where(pos[..., None], gt_for_anchor, anchors_xyxy)
            box_err = IOU_LOSSES[self.box_loss](pred, target, reduction="none")  # (B, N)
        box_sum = self.box_weight * (box_err * pos).sum()

        ce = F.cross_entropy(logits.reshape(-1, C), target_cls.reshape(-1), reduction="none")
        ce = ce.view(B, N)
        num_pos = pos.sum(1)  # (B,)
        num_neg = N - num_pos
        k = torch.minimum((self.neg_ratio * num_pos.clamp(min=1)).long(), num_neg)  # (B,)
        # rank background anchors by loss; positives go last
        ranking = ce.detach().masked_fill(pos, float("-inf"))
        rank = ranking.argsort(1, descending=True).argsort(1)  # (B, N) rank of each anchor
        hard_neg = (rank < k[:, None]) & ~pos
        in_loss = pos | hard_neg
        cls_sum = (ce * in_loss).sum()

        total_pos = num_pos.sum().clamp(min=1)
        box, cls = box_sum / total_pos, cls_sum / total_pos
        with torch.no_grad():
            correct = (logits.argmax(-1) == target_cls) & in_loss
            accuracy = correct.sum() / in_loss.sum().clamp(min=1)
            box_mae = ((loc - target_loc).abs().sum(-1) * pos).sum() / (4 * total_pos)
        return LossOutput(
            box + cls, box, cls, num_pos.float(), hard_neg.sum(1).float(), accuracy, box_mae
        )
