"""Batched postprocess equals a per-image torchvision NMS loop."""

import torch
from torchvision.ops import box_convert, nms

from ssd_lightning.core.box_coding import decode
from ssd_lightning.core.postprocess import postprocess

from _synthetic import anchors_300

ANCHORS_CXCYWH, _ = anchors_300()
N = ANCHORS_CXCYWH.shape[0]


def _reference(loc, logits, sizes, thr, iou, k):
    out = []
    for b in range(loc.shape[0]):
        scores = logits[b].softmax(-1)[:, 1]
        keep = scores > thr
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


def test_evaluation_thresholds_and_pre_nms_limit():
    gen = torch.Generator().manual_seed(1)
    loc = torch.randn(2, N, 4, generator=gen) * 0.5
    logits = torch.randn(2, N, 2, generator=gen)
    sizes = torch.tensor([[300, 300], [300, 300]])
    full = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.01, 0.45, 100, pre_nms_top_k=None)
    ref = _reference(loc, logits, sizes, 0.01, 0.45, 100)
    for o, (boxes, _) in zip(full, ref, strict=True):
        torch.testing.assert_close(o["boxes"], boxes)
        assert len(o["boxes"]) == 100
    limited = postprocess(loc, logits, ANCHORS_CXCYWH, sizes, 0.01, 0.45, 100, pre_nms_top_k=400)
    for o in limited:
        assert 0 < len(o["boxes"]) <= 100
        assert (o["scores"][:-1] >= o["scores"][1:]).all()


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
