"""torchvision's ``SSD`` class around the project's network (the same backbone, heads and
anchors), so the benchmark compares the two implementations of everything around the network."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD as TorchvisionSSD

from ssd_lightning.core.postprocess import PREDICT_DEFAULTS
from ssd_lightning.core.ssd import SSD


class _TVBackbone(nn.Module):
    """Our ResNet-34 trunk (with our ImageNet normalization) -> OrderedDict of the six maps."""

    def __init__(self, net: SSD):
        super().__init__()
        self.net_backbone = net.backbone
        self.register_buffer("mean", net.mean.clone(), persistent=False)
        self.register_buffer("std", net.std.clone(), persistent=False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.net_backbone((x - self.mean) / self.std)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class _TVHead(nn.Module):
    """Our heads in torchvision's SSDHead interface."""

    def __init__(self, net: SSD):
        super().__init__()
        self.heads = net.heads

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        loc, logits = self.heads(features)
        return {"bbox_regression": loc, "cls_logits": logits}


class _FixedAnchors(nn.Module):
    """torchvision's anchor-generator interface returning our anchors (N,4) xyxy in pixels."""

    def __init__(self, net: SSD):
        super().__init__()
        self.register_buffer("anchors_px", net.anchors_xyxy * net.image_size, persistent=False)

    def forward(self, image_list: Any, features: list[Tensor]) -> list[Tensor]:
        return [self.anchors_px] * image_list.tensors.shape[0]


def build_torchvision_ssd(net: SSD) -> nn.Module:
    """torchvision's SSD class sharing ``net``'s backbone and heads (same parameters)."""
    s = net.image_size
    return TorchvisionSSD(
        backbone=_TVBackbone(net),
        anchor_generator=_FixedAnchors(net),
        size=(s, s),
        num_classes=net.num_classes,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        head=_TVHead(net),
        score_thresh=PREDICT_DEFAULTS["score_threshold"],
        nms_thresh=PREDICT_DEFAULTS["nms_threshold"],
        detections_per_img=PREDICT_DEFAULTS["top_k"],
        iou_thresh=0.5,
        topk_candidates=net.num_anchors,  # no cap before NMS, as ours at the predict settings
        positive_fraction=0.2,  # 4:1 negatives, as ours
    ).to(net.anchors_xyxy.device)


def tv_inputs(batch: dict[str, Tensor]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images = list(batch["images"].unbind(0))
    targets = [
        {"boxes": b[m], "labels": lab[m]}
        for b, lab, m in zip(batch["boxes"], batch["labels"], batch["mask"], strict=True)
    ]
    return images, targets
