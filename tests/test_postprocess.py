"""Batched postprocess equals a per-image torchvision NMS loop; a confident detection is never
crowded out before NMS."""

import importlib
import math

import pytest
import torch
from torchvision.ops import box_convert, nms

from ssd_lightning.core.box_coding import decode
from ssd_lightning.core.postprocess import (
    EVALUATE_DEFAULTS,
    PREDICT_DEFAULTS,
    check_thresholds,
    postprocess,
)

from _synthetic import anchors_300

ANCHORS_CXCYWH, _ = anchors_300()
N = ANCHORS_CXCYWH.shape[0]


def _reference(loc, logits, sizes, thr, iou, k, cap=None):
    """One image at a time: threshold, the best `cap` of those, non-empty boxes, NMS, top k."""
    out = []
    for b in range(loc.shape[0]):
        scores = logits[b].softmax(-1)[:, 1]
        keep = (scores > thr).nonzero()[:, 0]
        if cap is not None:
            keep = keep[scores[keep].topk(min(cap, len(keep))).indices]
        boxes = box_convert(decode(loc[b][keep], ANCHORS_CXCYWH[keep]), "cxcywh", "xyxy")
        h, w = sizes[b].tolist()
        boxes = boxes.clamp(0, 1) * torch.tensor([w, h, w, h])
        scores = scores[keep]
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[nonempty], scores[nonempty]
        sel = nms(boxes, scores, iou)[:k]
        out.append((boxes[sel], scores[sel]))
    return out


def test_equals_per_image_torchvision_nms():
    gen = torch.Generator().manual_seed(0)
    B = 4
    loc = torch.randn(B, N, 4, generator=gen) * 0.5
    logits = torch.randn(B, N, 2, generator=gen) * 2
    logits[2, :, 1] = -20  # an image with no detection at all
    sizes = torch.tensor([[300, 400], [536, 559], [200, 200], [1000, 700]])
    ours = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.5, 0.45, 20, pre_nms_top_k=None)
    ref = _reference(loc, logits, sizes, 0.5, 0.45, 20)
    assert len(ours[2]["boxes"]) == 0
    for o, (boxes, scores) in zip(ours, ref, strict=True):
        torch.testing.assert_close(o["boxes"], boxes)
        torch.testing.assert_close(o["scores"], scores)
        assert (o["labels"] == 1).all()
        assert len(o["boxes"]) <= 20


@pytest.mark.parametrize("cap", [50, 400])
def test_evaluation_thresholds_and_pre_nms_limit(cap):
    gen = torch.Generator().manual_seed(1)
    loc = torch.randn(2, N, 4, generator=gen) * 0.5
    logits = torch.randn(2, N, 2, generator=gen)
    sizes = torch.tensor([[300, 300], [300, 300]])
    full = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.01, 0.45, 100, pre_nms_top_k=None)
    ref = _reference(loc, logits, sizes, 0.01, 0.45, 100)
    for o, (boxes, _) in zip(full, ref, strict=True):
        torch.testing.assert_close(o["boxes"], boxes)
        assert len(o["boxes"]) == 100
    limited = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.01, 0.45, 100, pre_nms_top_k=cap)
    ref = _reference(loc, logits, sizes, 0.01, 0.45, 100, cap)
    for o, (boxes, scores) in zip(limited, ref, strict=True):
        torch.testing.assert_close(o["boxes"], boxes)
        torch.testing.assert_close(o["scores"], scores)
        assert 0 < len(o["boxes"]) <= 100
        assert (o["scores"][:-1] >= o["scores"][1:]).all()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))  # foreground logit against a background logit of 0


def test_a_confident_detection_is_not_crowded_out_before_nms():
    """500 anchors fire at 0.993 on person A and one at 0.881 on person B. A per-image top 400
    taken before the threshold kept only A's anchors, so B was lost; at the predict settings both
    come back, and with a cap it is the best `cap` of each (image, class) above the threshold."""
    person_a = torch.tensor([0.3, 0.5, 0.2, 0.6])  # cxcywh, normalized
    person_b = torch.tensor([0.75, 0.5, 0.15, 0.5])
    gen = torch.Generator().manual_seed(0)
    others = torch.cat([torch.rand(2000, 2, generator=gen), torch.full((2000, 2), 0.05)], 1)
    anchors = torch.cat([person_a.expand(500, 4), person_b[None], others])
    jitter = torch.randn(len(anchors), 4, generator=gen) * 0.05  # A's boxes nearly the same
    logits = torch.zeros(2, len(anchors), 2)
    logits[:, :500, 1] = _logit(0.993)
    logits[:, 500, 1] = _logit(0.881)
    logits[:, 501:, 1] = -8.0  # background
    sizes = torch.tensor([[400, 600], [400, 600]])
    loc = jitter.expand(2, -1, -1)
    for out in postprocess(loc, logits, anchors, sizes, **PREDICT_DEFAULTS):
        assert len(out["boxes"]) == 2
        torch.testing.assert_close(out["scores"], torch.tensor([0.993, 0.881]))
        assert out["boxes"][1, 0] > 300  # B, on the right
    assert len(postprocess(loc, logits, anchors, sizes, pre_nms_top_k=501)[0]["boxes"]) == 2
    assert len(postprocess(loc, logits, anchors, sizes, pre_nms_top_k=500)[0]["boxes"]) == 1


def test_the_cap_is_per_class():
    """Another class's many anchors never take the cap's places."""
    anchors = torch.tensor([[0.3, 0.5, 0.2, 0.6]] * 500 + [[0.8, 0.5, 0.2, 0.6]])
    logits = torch.zeros(1, 501, 3)
    logits[0, :500, 1] = 9.0  # class 1 on every anchor of A
    logits[0, 500, 2] = 3.0  # class 2, weaker, on B
    out = postprocess(
        torch.zeros(1, 501, 4), logits, anchors, torch.tensor([[300, 300]]), pre_nms_top_k=10
    )[0]
    assert out["labels"].tolist() == [1, 2]


def test_pre_nms_top_k_is_a_threshold_setting():
    assert "pre_nms_top_k" not in PREDICT_DEFAULTS and EVALUATE_DEFAULTS["pre_nms_top_k"] == 400
    assert check_thresholds({"pre_nms_top_k": None}, "model.predict") == {"pre_nms_top_k": None}
    with pytest.raises(ValueError, match=r"model.evaluate.pre_nms_top_k=0: .*integer >= 1 or null"):
        check_thresholds({"pre_nms_top_k": 0}, "model.evaluate")


def test_multiclass_labels_are_foreground_classes():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, N, 3, generator=gen) * 3
    out = postprocess(
        torch.zeros(1, N, 4), logits, ANCHORS_CXCYWH, torch.tensor([[300, 300]]), 0.5, 0.45, 50
    )
    assert set(out[0]["labels"].tolist()) <= {1, 2} and len(out[0]["labels"]) > 0


def test_boxes_outside_the_image_are_not_detections():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.2, 0.4]])  # cxcywh normalized
    loc = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [40.0, 0.0, 0.0, 0.0]]])  # 2nd: moved far right
    logits = torch.tensor([[[0.0, 5.0], [0.0, 6.0]]])
    out = postprocess(loc, logits, anchors, torch.tensor([[100, 200]]), 0.5, 0.45, 20)[0]
    assert len(out["boxes"]) == 1
    torch.testing.assert_close(out["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_equal_scores_keep_the_lower_candidate():
    # Saturated scores are exactly equal: which of two overlapping boxes survives NMS must not be
    # left to the topk / NMS kernels (the exported ONNX detector has to keep the same one).
    anchors = torch.tensor(
        [[0.5, 0.5, 0.2, 0.4], [0.52, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]
    )
    logits = torch.tensor([[[0.0, 40.0], [0.0, 50.0], [0.0, 60.0], [0.0, -9.0]]])
    assert logits.softmax(-1)[0, :3, 1].unique().tolist() == [1.0]
    sizes = torch.tensor([[100, 100]])
    for pre_nms_top_k in (None, 3):  # all candidates, or the three tied ones through topk
        out = postprocess(
            torch.zeros(1, 4, 4), logits, anchors, sizes, 0.5, 0.45, 20, pre_nms_top_k
        )
        assert out[0]["boxes"][:, 0].round().tolist() == [40.0, 5.0]  # x1: anchors 0 and 2


@pytest.mark.parametrize("batch", [16, 64])
def test_detections_do_not_depend_on_the_position_in_the_batch(batch):
    # Two small boxes whose IoU sweeps across the NMS threshold, in every image of a batch of an
    # 80-class dataset: each image must keep exactly what the first one keeps (one NMS over the
    # batch must not round a far image's boxes differently).
    C = 81
    anchors = torch.tensor([[0.5, 0.5, 0.01, 0.01]] * 2)  # 6.4 px boxes in a 640 px image
    logits = torch.full((batch, 2, C), -20.0)
    logits[:, 0, C - 1], logits[:, 1, C - 1] = 10.0, 9.0
    sizes = torch.tensor([[640, 640]] * batch)
    kept = set()
    for dx in torch.arange(3.5, 4.2, 0.002).tolist():
        loc = torch.zeros(batch, 2, 4)
        loc[:, 1, 0] = dx  # the second box moves right: IoU ~0.5 -> ~0.4
        out = postprocess(loc, logits, anchors, sizes, 0.01, 0.45, 100)
        counts = {len(o["boxes"]) for o in out}
        assert len(counts) == 1, f"dx={dx}: images keep {sorted(counts)} boxes"
        for o in out[1:]:
            assert torch.equal(o["boxes"], out[0]["boxes"])
        kept |= counts
    assert kept == {1, 2}  # the sweep crossed the threshold


def test_nms_by_groups_of_images_keeps_what_one_nms_keeps(monkeypatch):
    # Above NMS_MAX_BOXES candidates (an untrained model at a large batch) NMS runs over groups
    # of whole images: the very same detections.
    g = torch.Generator().manual_seed(0)
    B = 6
    loc, logits = torch.randn(B, N, 4, generator=g) * 0.5, torch.randn(B, N, 2, generator=g) * 3
    sizes = torch.tensor([[300, 400], [500, 200]] * (B // 2))
    module = importlib.import_module("ssd_lightning.core.postprocess")  # core exports a function
    monkeypatch.setattr(module, "NMS_MAX_BOXES", 10**9)  # one NMS call
    whole = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.3, 0.45, 500)
    candidates = int((logits.softmax(-1)[..., 1] > 0.3).sum())
    monkeypatch.setattr(module, "NMS_MAX_BOXES", candidates // 4)  # ~4 groups
    grouped = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.3, 0.45, 500)
    assert sum(len(d["boxes"]) for d in whole) > 100
    for a, b in zip(whole, grouped, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key
