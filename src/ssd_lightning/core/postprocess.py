"""Batched inference: decode, confidence threshold, NMS and top-k for a whole batch at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert, nms

from ssd_lightning.core.box_coding import VARIANCES, decode

# Thresholds for predictions (predict, TensorBoard images) and for COCO evaluation (mAP wants the
# low-score detections too). The configs' model.predict / model.evaluate default to these.
PREDICT_DEFAULTS = {"score_threshold": 0.5, "nms_threshold": 0.45, "top_k": 20}
EVALUATE_DEFAULTS = {"score_threshold": 0.01, "nms_threshold": 0.45, "top_k": 100}
PRE_NMS_TOP_K = 400  # each image's best candidates kept before NMS (the exported detector's too)


def check_thresholds(thresholds: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``{"score_threshold", "nms_threshold", "top_k"}`` checked; ``key`` names the config entry
    in the error (e.g. ``model.predict``). Returns them as a plain dict."""
    checks = {
        "score_threshold": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "nms_threshold": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    }
    unknown = set(thresholds) - set(checks)
    if unknown:
        raise ValueError(f"{key}: unknown keys {sorted(unknown)}; allowed: {list(checks)}")
    for name, value in thresholds.items():
        ok, allowed = checks[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and ok(value)):
            raise ValueError(f"{key}.{name}={value!r}: allowed values are {allowed}")
    return dict(thresholds)


def postprocess(
    loc: Tensor,
    logits: Tensor,
    anchors_cxcywh: Tensor,
    orig_sizes: Tensor,
    score_threshold: float = 0.5,
    nms_threshold: float = 0.45,
    top_k: int = 20,
    pre_nms_top_k: int | None = PRE_NMS_TOP_K,
    variances: tuple[float, float] = VARIANCES,
) -> list[dict[str, Tensor]]:
    """loc (B,N,4), logits (B,N,C), anchors (N,4) cxcywh normalized, orig_sizes (B,2) (h, w).

    Returns one dict per image: ``boxes`` (K,4) xyxy in original image pixels, ``scores`` (K,),
    ``labels`` (K,) int64 (1..C-1), sorted by score, K <= top_k. Foreground classes are scored
    with a softmax; ``pre_nms_top_k`` keeps only each image's best candidates before NMS (None:
    all). One NMS call covers the batch, with (image, class) as the group.
    """
    boxes, scores, labels, image = select_detections(
        loc,
        logits,
        anchors_cxcywh,
        orig_sizes,
        score_threshold,
        nms_threshold,
        top_k,
        pre_nms_top_k,
        variances,
    )
    counts = torch.bincount(image, minlength=len(loc)).tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            boxes.split(counts), scores.split(counts), labels.split(counts), strict=True
        )
    ]


def select_detections(
    loc: Tensor,
    logits: Tensor,
    anchors_cxcywh: Tensor,
    orig_sizes: Tensor,
    score_threshold: float,
    nms_threshold: float,
    top_k: int,
    pre_nms_top_k: int | None,
    variances: tuple[float, float] = VARIANCES,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``postprocess`` as flat tensors: ``boxes`` (D,4) xyxy in original image pixels,
    ``scores`` (D,), ``labels`` (D,) int64 and ``image`` (D,) int64 (the batch index), sorted by
    image, then by score. No host sync beyond ``nonzero`` and no Python branch on the data, so
    ``torch.export`` traces it: the exported ONNX detector runs exactly this code.
    """
    B, N, C = logits.shape
    scores = logits.float().softmax(-1)[..., 1:].reshape(B, -1)  # (B, N*(C-1)), index n*(C-1)+c
    if pre_nms_top_k is not None and pre_nms_top_k < scores.shape[1]:
        scores, cand = scores.topk(pre_nms_top_k, dim=1)  # (B, K)
        # back to index order: how topk lists equal scores is the runtime's choice (see below)
        cand, perm = cand.sort(dim=1)
        scores = scores.gather(1, perm)
    else:
        cand = torch.arange(scores.shape[1], device=scores.device).expand(B, -1)
    anchor_idx = torch.div(cand, C - 1, rounding_mode="floor")
    labels = cand % (C - 1) + 1
    offsets = loc.float().gather(1, anchor_idx[..., None].expand(-1, -1, 4))
    boxes = decode(offsets, anchors_cxcywh[anchor_idx], variances)  # (B, K, 4) cxcywh normalized
    boxes = box_convert(boxes, "cxcywh", "xyxy").clamp(0.0, 1.0)
    hw = orig_sizes.to(boxes)
    boxes = boxes * torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None]  # pixels

    # boxes entirely outside the image collapse to zero area under the clamp: not detections
    nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    img, j = ((scores > score_threshold) & nonempty).nonzero(as_tuple=True)  # the one sync
    # NMS visits boxes by score, and confident scores saturate to exactly 1.0: the order among
    # equal scores would be the NMS kernel's own. A stable sort fixes it to (score, image,
    # candidate index) and NMS gets ranks as scores, so every runtime (torch, onnxruntime) keeps
    # the same boxes.
    scores, order = scores[img, j].sort(descending=True, stable=True)
    img, j = img[order], j[order]
    boxes, labels = boxes[img, j], labels[img, j]
    # One NMS over the batch: each (image, class) group is shifted to its own region of the plane
    # (boxes lie in [0, the largest image side], so steps of that side + 1 never overlap).
    # (batched_nms does this too, but above 100k coordinates on CUDA it switches to a per-group
    # loop with a host sync - hit at batch 128.)
    group = (img * C + labels).to(boxes)
    shifted = boxes + (group * (hw.max() + 1))[:, None]
    n = scores.shape[0]
    ranks = torch.arange(n, 0, -1, device=boxes.device, dtype=boxes.dtype)  # exact below 2**24
    keep = nms(shifted, ranks, nms_threshold)  # ascending: sorted by score
    # top-k per image: order the survivors by image, then by score (unique keys: any sort is
    # stable), then rank within each image
    keep = keep[(img[keep] * n + keep).argsort()]
    img_keep = img[keep]
    # per-image counts; scatter_add rather than bincount, which ONNX export lacks for a dynamic B
    counts = torch.zeros(B, dtype=img.dtype, device=img.device)
    counts = counts.scatter_add(0, img_keep, torch.ones_like(img_keep))
    starts = counts.cumsum(0) - counts
    rank = torch.arange(keep.shape[0], device=keep.device) - starts[img_keep]
    keep = keep[rank < top_k]
    return boxes[keep], scores[keep], labels[keep], img[keep]
