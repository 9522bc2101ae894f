"""The export's parity check: the three ONNX graphs in onnxruntime (CPU) against the PyTorch
model on real images (``check_parity``), and its one-line-per-graph summary.

Boxes are xyxy; the detector's and the post-processing's in original image pixels, compared in
network-input pixels for the detector (its fp32 noise scales with the resize).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssd_lightning.core.postprocess import postprocess
from ssd_lightning.core.ssd import SSD
from ssd_lightning.data.images import InputError, image_files, read_rgb
from ssd_lightning.data.presets import build_eval_transform
from ssd_lightning.tools.onnx_runtime import (
    DETECTOR,
    NETWORK,
    POSTPROCESS,
    OnnxDetector,
    open_session,
    per_image,
)

log = logging.getLogger(__name__)

# the bounds (see check_parity)
NETWORK_TOLERANCE, POSTPROCESS_BOX_PX, DETECTOR_BOX_PX, SCORE_TOLERANCE = 1e-5, 1e-3, 1e-2, 1e-4


def check_images(folder: str | Path, count: int, image_size: int) -> tuple[Tensor, Tensor, list]:
    """The first ``count`` readable images of ``folder`` (sorted; or the one image ``folder``
    names) as the network sees them:
    images (B,3,S,S) in [0,1], orig_sizes (B,2) (h, w), and their paths. Files that cannot be
    read are skipped with a warning, as predict skips them."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise InputError(f"check.images={root}: no such folder (or check.enabled=false)")
    candidates = [root] if root.is_file() else image_files(root)  # one photo, or a folder
    files, originals = [], []
    for f in candidates:
        if len(files) == count:
            break
        try:
            originals.append(read_rgb(f))
        except InputError as e:
            log.warning("%s: skipped in the parity check", e)
            continue
        files.append(f)
    if not files:
        raise InputError(
            f"check.images={root}: no readable images there for the parity check (give a folder "
            "of photos, or check.enabled=false)"
        )
    transform = build_eval_transform(image_size)
    images = torch.stack([transform(img) for img in originals])
    sizes = torch.tensor([list(img.shape[-2:]) for img in originals])
    return images, sizes, files


def compare_detections(
    ours: Sequence[Mapping[str, Tensor]],
    ref: Sequence[Mapping[str, Tensor]],
    box_tolerance: float,
    px_scale: Tensor | None = None,
    score_threshold: float | None = None,
) -> dict[str, Any]:
    """Per image: each of ours matched one to one to the reference box nearest to it with the
    same label (mutually nearest, within ``box_tolerance``). Box differences are in the boxes'
    pixels, or divided by ``px_scale`` (B,2) (h, w) (e.g. original pixels per network-input
    pixel). A detection on one side only is allowed at a cut alone: its score within
    SCORE_TOLERANCE of ``score_threshold`` or of the image's lowest score (top-k), where two
    near-equal scores are ordered by fp32 noise (``boundary`` counts them)."""
    worst_box = worst_score = 0.0
    count_mismatch, boundary = [], 0
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        if not len(o["boxes"]) and not len(r["boxes"]):
            continue
        scale = 1.0 if px_scale is None else px_scale[i].flip(0).repeat(2).float()  # w h w h
        dist = ((o["boxes"][:, None] - r["boxes"][None]).abs() / scale).amax(-1)  # (K, L)
        dist[o["labels"][:, None] != r["labels"][None]] = float("inf")
        near_d, nearest = torch.cat([dist, torch.full_like(dist[:, :1], float("inf"))], 1).min(1)
        back = torch.cat([dist, torch.full_like(dist[:1], float("inf"))]).argmin(0)  # (L,)
        mutual = near_d <= box_tolerance  # pairs of mutually nearest boxes within it
        mutual[mutual.clone()] = back[nearest[mutual]] == torch.nonzero(mutual).flatten()
        matched_r = torch.zeros(len(r["boxes"]), dtype=torch.bool)
        matched_r[nearest[mutual]] = True
        # the reference's own cuts: its lowest score (top-k) and the threshold
        cuts = torch.tensor(
            r["scores"][-1:].tolist() + ([] if score_threshold is None else [score_threshold])
        )
        at_cut_o, at_cut_r = (
            ((d["scores"][:, None] - cuts[None]).abs() <= SCORE_TOLERANCE).any(1) for d in (o, r)
        )
        odd_o, odd_r = ~mutual & ~at_cut_o, ~matched_r & ~at_cut_r
        boundary += max(int((~mutual).sum() - odd_o.sum()), int((~matched_r).sum() - odd_r.sum()))
        if odd_o.any() or odd_r.any():
            if len(o["boxes"]) != len(r["boxes"]):
                count_mismatch.append(i)
            worst_box = max(worst_box, float(near_d[odd_o].max()) if odd_o.any() else float("inf"))
        if mutual.any():
            worst_box = max(worst_box, float(near_d[mutual].max()))
            diff = (o["scores"][mutual] - r["scores"][nearest[mutual]]).abs().max()
            worst_score = max(worst_score, float(diff))
    return {
        "detections": sum(len(d["boxes"]) for d in ref),
        "max_box_diff_px": worst_box,
        "max_score_diff": worst_score,
        "count_mismatch_images": count_mismatch,
        "boundary": boundary,
        "ok": not count_mismatch and worst_box <= box_tolerance and worst_score <= SCORE_TOLERANCE,
    }


def check_parity(
    net: SSD, meta: Mapping[str, Any], images: Tensor, orig_sizes: Tensor
) -> dict[str, Any]:
    """The three graphs in onnxruntime (CPU) against the PyTorch model on ``images`` (B,3,S,S)
    in [0,1] with ``orig_sizes`` (B,2) (h, w):

    - ``network``: loc / logits within NETWORK_TOLERANCE of SSD.forward's, relative to their
      largest magnitude (fp32 kernels differ in summation order);
    - ``postprocess``, fed SSD.forward's own outputs: core ``postprocess``'s detections, boxes
      within POSTPROCESS_BOX_PX original pixels, scores within SCORE_TOLERANCE;
    - ``detector``, end to end, on the batch and on its first image alone (the batch axis is
      dynamic): SSD.detect's detections, boxes within DETECTOR_BOX_PX network-input pixels (the
      network's fp32 noise moves them, more so where its outputs are extreme).
    """
    files, thr = meta["files"], meta["thresholds"]
    net = net.to("cpu", torch.float32).eval()
    with torch.no_grad():
        loc, logits = net(images)
    result: dict[str, Any] = {"images": len(images)}

    network, _ = open_session(files[NETWORK], device="cpu")
    got = network.run(None, {"images": images.numpy()})
    rel = max(
        float((torch.from_numpy(g) - r).abs().max() / r.abs().max().clamp(min=1.0))
        for g, r in zip(got, (loc, logits, net.anchors_cxcywh), strict=True)
    )
    result[NETWORK] = {"max_rel_diff": rel, "ok": rel <= NETWORK_TOLERANCE}

    post, _ = open_session(files[POSTPROCESS], device="cpu")
    feeds = {"loc": loc.numpy(), "logits": logits.numpy(), "orig_sizes": orig_sizes.numpy()}
    got = per_image(post.run(None, feeds), len(images), thr["score_threshold"], thr["top_k"])
    ref = postprocess(loc, logits, net.anchors_cxcywh, orig_sizes, **thr)
    cut = thr["score_threshold"]
    result[POSTPROCESS] = compare_detections(got, ref, POSTPROCESS_BOX_PX, None, cut)

    detector = OnnxDetector(files[DETECTOR], device="cpu")
    scale = orig_sizes / images.shape[-1]  # (B, 2) original pixels per input pixel
    parts = []
    for batch, sizes, sc in ((images, orig_sizes, scale), (images[:1], orig_sizes[:1], scale[:1])):
        ref = net.detect(batch, sizes, **thr)
        got = detector.detect(batch, sizes)
        parts.append(compare_detections(got, ref, DETECTOR_BOX_PX, sc, cut))
    result[DETECTOR] = {
        "detections": parts[0]["detections"],
        "max_box_diff_input_px": max(p["max_box_diff_px"] for p in parts),
        "max_score_diff": max(p["max_score_diff"] for p in parts),
        "count_mismatch_images": parts[0]["count_mismatch_images"],
        "boundary": parts[0]["boundary"],
        "ok": all(p["ok"] for p in parts),
    }
    result["ok"] = all(result[g]["ok"] for g in (NETWORK, POSTPROCESS, DETECTOR))
    return result


def parity_summary(parity: Mapping[str, Any]) -> str:
    """One line per graph: what was compared and how close it came."""
    net, post, det = parity[NETWORK], parity[POSTPROCESS], parity[DETECTOR]

    def counts(p: Mapping[str, Any]) -> str:
        bad, ties = p["count_mismatch_images"], p.get("boundary", 0)
        tie = f" ({ties} tied at the score / top-k cut, either kept)" if ties else ""
        return f"counts differ on images {bad}" if bad else f"{p['detections']} detections{tie}"

    return "\n".join(
        [
            f"network:     loc/logits within {net['max_rel_diff']:.2g} relative (allowed "
            f"{NETWORK_TOLERANCE})",
            f"postprocess: {counts(post)}, boxes within {post['max_box_diff_px']:.2g} px "
            f"(allowed {POSTPROCESS_BOX_PX}), scores within {post['max_score_diff']:.2g} "
            f"(allowed {SCORE_TOLERANCE})",
            f"detector:    {counts(det)}, boxes within {det['max_box_diff_input_px']:.2g} px "
            f"of the input (allowed {DETECTOR_BOX_PX}), scores within "
            f"{det['max_score_diff']:.2g} (allowed {SCORE_TOLERANCE})",
        ]
    )
