"""Batched matching: equal to torchvision's SSDMatcher, plus its invariants."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from ssd_lightning.core.matching import match_anchors

from _synthetic import anchors_300, random_gt

ANCHORS_CXCYWH, ANCHORS_XYXY = anchors_300()


def test_equals_torchvision_ssd_matcher_per_image():
    gen = torch.Generator().manual_seed(0)
    counts = [3, 1, 7, 2]
    boxes, _, mask = random_gt(counts, gen)
    ours = match_anchors(boxes, mask, ANCHORS_XYXY, 0.5)
    matcher = SSDMatcher(0.5)
    for b, n in enumerate(counts):
        theirs = matcher(box_iou(boxes[b, :n], ANCHORS_XYXY))
        theirs = torch.where(theirs >= 0, theirs, -1)  # torchvision: -1 below, -2 between (none)
        assert torch.equal(ours[b], theirs)


def test_image_without_gt_is_all_negative():
    boxes = torch.zeros(2, 1, 4)
    mask = torch.tensor([[True], [False]])
    boxes[0, 0] = torch.tensor([0.1, 0.1, 0.4, 0.9])
    matched = match_anchors(boxes, mask, ANCHORS_XYXY)
    assert (matched[1] == -1).all()
    assert (matched[0] >= 0).any()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
@example(counts=[5], seed=106965363)  # GTs 2 and 4 share their best anchor; 2 has no other
def test_gts_get_a_positive_and_forced_matches_hold(counts, seed):
    boxes, _, mask = random_gt(counts, torch.Generator().manual_seed(seed))
    matched = match_anchors(boxes, mask, ANCHORS_XYXY, 0.5)
    for b, n in enumerate(counts):
        if n == 0:
            assert (matched[b] == -1).all()
            continue
        iou = box_iou(boxes[b, :n], ANCHORS_XYXY)
        best = iou.argmax(1)
        owners = set()
        for g in range(n):
            # forced: a GT's best anchor belongs to it, unless a later GT has the same best anchor
            owner = max(h for h in range(n) if best[h] == best[g])
            assert matched[b, best[g]] == owner
            owners.add(owner)
        # >= 1 positive for every GT that owns its best anchor; a GT whose best anchor a later
        # GT takes (as in torchvision's SSDMatcher) may be left with none
        positives = set(matched[b][matched[b] >= 0].tolist())
        assert owners <= positives <= set(range(n))
        # every other positive reaches the threshold with the GT it is assigned to
        pos = (matched[b] >= 0).nonzero().flatten()
        forced = set(best.tolist())
        for a in pos.tolist():
            if a not in forced:
                assert iou[matched[b, a], a] >= 0.5
