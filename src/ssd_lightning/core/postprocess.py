"""Batched inference: decode, confidence threshold, NMS and top-k for a whole batch at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert, nms

from ssd_lightning.core.box_coding import VARIANCES, decode
from ssd_lightning.core.plain import is_int, is_number

# Thresholds for predictions (predict, TensorBoard images) and for COCO evaluation (mAP wants the
# low-score detections too). The configs' model.predict / model.evaluate default to these.
# pre_nms_top_k (optional in both) caps the candidates above the threshold per (image, class)
# before NMS. Predictions have no cap, so a confident detection is never crowded out by another
# object's many anchors; evaluation keeps torchvision's SSD cap, which bounds NMS when its low
# threshold passes nearly every anchor (an untrained network).
PREDICT_DEFAULTS = {"score_threshold": 0.5, "nms_threshold": 0.45, "top_k": 20}
EVALUATE_DEFAULTS = {
    "score_threshold": 0.01,
    "nms_threshold": 0.45,
    "top_k": 100,
    "pre_nms_top_k": 400,
}


def check_thresholds(thresholds: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``{"score_threshold", "nms_threshold", "top_k", "pre_nms_top_k"}`` checked; ``key`` names
    the config entry in the error (e.g. ``model.predict``). Returns them as a plain dict."""
    checks = {
        "score_threshold": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "nms_threshold": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: is_int(v, 1), "an integer >= 1"),
        "pre_nms_top_k": (lambda v: v is None or is_int(v, 1), "an integer >= 1 or null (no cap)"),
    }
    unknown = set(thresholds) - set(checks)
    if unknown:
        raise ValueError(f"{key}: unknown keys {sorted(unknown)}; allowed: {list(checks)}")
    for name, value in thresholds.items():
        ok, allowed = checks[name]
        if not ok(value):
            raise ValueError(f"{key}.{name}={value!r}: allowed values are {allowed}")
    return dict(thresholds)


# One NMS call takes at most this many boxes in eager mode (whole images per call, so this only
# bounds the calls of a batch with many candidates, e.g. an untrained model's ~3,900 per image).
# NMS costs n**2 (torchvision's kernel fills an n x n bit mask, which its CUDA version copies to
# the host and fails on above ~393k boxes): 4,096 boxes per call ran a 16-image batch of an
# untrained model 11x faster than 65,536 on the CPU, and a trained model's batch of 128 (a few
# dozen candidates per image) still takes one call.
NMS_MAX_BOXES = 4_096


def _nms_by_images(shifted: Tensor, ranks: Tensor, img: Tensor, B: int, thr: float) -> Tensor:
    """NMS of the cells (``shifted`` (n, 4), ``ranks`` (n,), ``img`` (n,) image of each box),
    indices of the kept boxes. The images' cells never overlap, so NMS over groups of whole
    images keeps exactly what one NMS over all keeps; above ``NMS_MAX_BOXES`` (eager only: a
    traced graph has no Python int to compare) the images go by groups below that size."""
    n = shifted.shape[0]
    if not isinstance(n, int) or n <= NMS_MAX_BOXES:
        return nms(shifted, ranks, thr)
    by_image = img.argsort(stable=True)  # the boxes of image 0, then of image 1, ...
    keep, start, end = [], 0, 0
    for count in torch.bincount(img, minlength=B).tolist():  # the one extra sync
        if end > start and end - start + count > NMS_MAX_BOXES:
            idx = by_image[start:end]
            keep.append(idx[nms(shifted[idx], ranks[idx], thr)])
            start = end
        end += count
    idx = by_image[start:end]
    keep.append(idx[nms(shifted[idx], ranks[idx], thr)])
    return torch.cat(keep)


def postprocess(
    loc: Tensor,
    logits: Tensor,
    anchors_cxcywh: Tensor,
    orig_sizes: Tensor,
    score_threshold: float = PREDICT_DEFAULTS["score_threshold"],
    nms_threshold: float = PREDICT_DEFAULTS["nms_threshold"],
    top_k: int = PREDICT_DEFAULTS["top_k"],
    pre_nms_top_k: int | None = None,
    variances: tuple[float, float] = VARIANCES,
) -> list[dict[str, Tensor]]:
    """loc (B,N,4), logits (B,N,C), anchors (N,4) cxcywh normalized, orig_sizes (B,2) (h, w).

    Returns one dict per image: ``boxes`` (K,4) xyxy in original image pixels, ``scores`` (K,),
    ``labels`` (K,) int64 (1..C-1), sorted by score, K <= top_k. Foreground classes are scored
    with a softmax; a candidate is an (anchor, class) above ``score_threshold`` whose box is not
    empty; ``pre_nms_top_k`` keeps the best that many above the threshold per (image, class)
    (None: all). One NMS call covers the batch, with (image, class) as the group.
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
    counts = torch.zeros(len(loc), dtype=torch.int64, device=image.device)
    counts = counts.scatter_add_(0, image, torch.ones_like(image)).tolist()  # the second sync
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
    pre_nms_top_k: int | None = None,
    variances: tuple[float, float] = VARIANCES,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``postprocess`` as flat tensors: ``boxes`` (D,4) xyxy in original image pixels,
    ``scores`` (D,), ``labels`` (D,) int64 and ``image`` (D,) int64 (the batch index), sorted by
    image, then by score. No host sync beyond ``nonzero`` and no Python branch on the data, so
    ``torch.export`` traces it: the exported ONNX detector runs exactly this code.
    """
    B, N, C = logits.shape
    scores = logits.float().softmax(-1)[..., 1:]  # (B, N, C-1)
    above = scores > score_threshold
    if pre_nms_top_k is not None and pre_nms_top_k < N:
        # the best of each (image, class) among those above the threshold, so another object's
        # many anchors above it never push a candidate out before NMS has merged them
        scores, anchor = torch.where(above, scores, -1.0).topk(pre_nms_top_k, dim=1)
        # back to anchor order: how topk lists equal scores is the runtime's choice (see below)
        anchor, perm = anchor.sort(dim=1)
        scores = scores.gather(1, perm)
        above = scores > score_threshold  # (B, K, C-1)
    else:
        anchor = torch.arange(N, device=scores.device)[None, :, None].expand_as(scores)
    anchor = anchor.reshape(B, -1)  # (B, M): slot m = k * (C-1) + class index
    offsets = loc.float().gather(1, anchor[..., None].expand(-1, -1, 4))
    boxes = decode(offsets, anchors_cxcywh[anchor], variances)  # (B, M, 4) cxcywh normalized
    unit = box_convert(boxes, "cxcywh", "xyxy").clamp(0.0, 1.0)  # (B, M, 4) xyxy normalized
    hw = orig_sizes.to(unit)
    boxes = unit * torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None]  # pixels
    # boxes entirely outside the image collapse to zero area under the clamp: not detections
    nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    img, slot = (above.reshape(B, -1) & nonempty).nonzero(as_tuple=True)  # the one sync
    # NMS visits boxes by score, and confident scores saturate to exactly 1.0: the order among
    # equal scores would be the NMS kernel's own. A stable sort fixes it to (score, image,
    # anchor, class) and NMS gets ranks as scores, so every runtime (torch, onnxruntime) keeps
    # the same boxes.
    scores, order = scores.reshape(B, -1)[img, slot].sort(descending=True, stable=True)
    img, slot = img[order], slot[order]
    boxes, unit, labels = boxes[img, slot], unit[img, slot], slot % (C - 1) + 1
    # One NMS over the batch: each (image, class) group moves to its own cell of the plane, the
    # class along x, the image along y (batched_nms shifts too, but along one axis, and above
    # 100k coordinates on CUDA it switches to a per-group loop with a host sync). IoU does not
    # change when an axis is scaled, so the cells hold the normalized boxes, snapped to a 2**-15
    # grid: shifted by even integers below 512 (up to 255 classes and 256 images a batch) the
    # corners are exact in float32, and an image's detections never depend on where it sits
    # in the batch (shifting pixel boxes by group * image side rounded them at large batches).
    cell = 2 * torch.stack([labels, img, labels, img], -1).to(unit)  # (D, 4)
    shifted = torch.round(unit * 2**15) / 2**15 + cell
    n = scores.shape[0]
    ranks = torch.arange(n, 0, -1, device=boxes.device, dtype=unit.dtype)  # exact below 2**24
    keep = _nms_by_images(shifted, ranks, img, B, nms_threshold)
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
