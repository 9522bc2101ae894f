"""The SSD network: normalization, backbone, heads and the anchors as buffers."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from ssd_lightning.core.anchors import anchor_pairs, generate_anchors
from ssd_lightning.core.backbone import ResNet34Backbone
from ssd_lightning.core.heads import SSDHeads
from ssd_lightning.core.plain import is_int, to_plain
from ssd_lightning.core.postprocess import PREDICT_DEFAULTS, postprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the integer settings of model.net: (smallest allowed value, what it means)
_NET_INTS = {
    "num_classes": (2, "background + at least one class"),
    "image_size": (64, "300 is the design"),
    "feature_channels": (1, "256 is the design"),
}


def net_int_error(key: str, value: object) -> str | None:
    """The message naming ``model.net.<key>`` if ``value`` is not an allowed integer, else None.
    Also asked by the config validation, before the DataModule (whose ``data.image_size`` follows
    ``model.net.image_size``) would report a bad size under its own key and bound."""
    low, meaning = _NET_INTS[key]
    if not is_int(value, low):
        return f"model.net.{key}={value!r}: allowed values are integers >= {low} ({meaning})"
    return None


class SSD(nn.Module):
    """images (B, 3, S, S) float in [0, 1] -> loc (B, N, 4) offsets, logits (B, N, num_classes).

    ``anchors`` is an anchor preset (see ``core.anchors``); ``weights`` is
    ``auto | imagenet | none | <path>`` for the ResNet-34 trunk.
    """

    def __init__(
        self,
        anchors: Mapping,
        num_classes: int = 2,
        image_size: int = 300,
        weights: str = "auto",
        head_kernel_size: int = 1,
        feature_channels: int = 256,
    ):
        super().__init__()
        for key, value in (
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("feature_channels", feature_channels),
        ):
            error = net_int_error(key, value)
            if error:
                raise ValueError(error)
        anchors = to_plain(anchors)
        self.config = {
            "anchors": anchors,
            "num_classes": num_classes,
            "image_size": image_size,
            "weights": str(weights),
            "head_kernel_size": head_kernel_size,
            "feature_channels": feature_channels,
        }
        self.num_classes = num_classes
        self.image_size = image_size
        pairs = anchor_pairs(anchors)  # validates the preset first: cheap, and errors come early
        self.backbone = ResNet34Backbone(image_size, str(weights), feature_channels)
        self.weights_source = self.backbone.weights_source
        self.feature_sizes = self.backbone.feature_sizes
        self.anchors_per_location = [len(level) for level in pairs]
        anchors_cxcywh = generate_anchors(
            self.feature_sizes, pairs, clip=bool(anchors.get("clip", True))
        )
        self.heads = SSDHeads(
            self.anchors_per_location, num_classes, feature_channels, head_kernel_size
        )
        # Non-persistent: derived from the config, so checkpoints stay loadable if the code changes.
        self.register_buffer(
            "anchors_cxcywh", anchors_cxcywh, persistent=False
        )  # (N, 4) normalized
        self.register_buffer(
            "anchors_xyxy", box_convert(anchors_cxcywh, "cxcywh", "xyxy"), persistent=False
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_anchors(self) -> int:
        return self.anchors_cxcywh.shape[0]

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, S, S) in [0, 1] -> six maps (B, 256, h_k, w_k)."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.feature_maps(images))

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        orig_sizes: Tensor | None = None,
        score_threshold: float = PREDICT_DEFAULTS["score_threshold"],
        nms_threshold: float = PREDICT_DEFAULTS["nms_threshold"],
        top_k: int = PREDICT_DEFAULTS["top_k"],
        pre_nms_top_k: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """images (B, 3, S, S) in [0, 1] -> per-image detections, boxes xyxy in the pixels of
        ``orig_sizes`` (B, 2) (h, w) - the original images' - or, when None, of ``images``
        themselves (to draw on the network input). Runs in eval mode and restores the mode."""
        if orig_sizes is None:
            orig_sizes = torch.tensor([images.shape[-2:]], device=images.device).expand(
                len(images), 2
            )
        was_training = self.training
        self.eval()
        try:
            loc, logits = self(images)
        finally:
            self.train(was_training)
        return postprocess(
            loc,
            logits,
            self.anchors_cxcywh,
            orig_sizes,
            score_threshold,
            nms_threshold,
            top_k,
            pre_nms_top_k,
        )
