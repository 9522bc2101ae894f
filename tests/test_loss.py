"""MultiBox loss: equal to torchvision's SSD.compute_loss (and its IoU losses), plus mining
invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD as TorchvisionSSD
from torchvision.ops import box_iou, distance_box_iou_loss, generalized_box_iou_loss

from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.matching import match_anchors

from _synthetic import anchors_300, random_gt

ANCHORS_CXCYWH, ANCHORS_XYXY = anchors_300()
N = ANCHORS_XYXY.shape[0]
# torchvision's decoder for our coding: weights 1 / variances (0.1, 0.2)
TV_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


def _torchvision_ssd():
    # Only compute_loss is used; the backbone/head are placeholders.
    return TorchvisionSSD(
        nn.Identity(), DefaultBoxGenerator([[2]]), (300, 300), 2, head=nn.Identity()
    )


def test_equals_torchvision_compute_loss():
    gen = torch.Generator().manual_seed(1)
    counts = [2, 5, 1]
    boxes, labels, mask = random_gt(counts, gen)
    loc = torch.randn(3, N, 4, generator=gen)
    logits = torch.randn(3, N, 2, generator=gen)
    ours = MultiBoxLoss(neg_ratio=3, beta=1.0)(
        loc, logits, boxes, labels, mask, ANCHORS_CXCYWH, ANCHORS_XYXY
    )
    tv = _torchvision_ssd()
    matched = match_anchors(boxes, mask, ANCHORS_XYXY)
    targets = [{"boxes": boxes[b, :n], "labels": labels[b, :n]} for b, n in enumerate(counts)]
    theirs = tv.compute_loss(
        targets,
        {"bbox_regression": loc, "cls_logits": logits},
        [ANCHORS_XYXY] * 3,
        list(matched),
    )
    torch.testing.assert_close(ours.box, theirs["bbox_regression"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.cls, theirs["classification"], atol=1e-4, rtol=1e-4)


def test_default_settings_use_beta_and_ratio_of_the_design():
    loss = MultiBoxLoss()
    assert (loss.neg_ratio, loss.beta, loss.iou_threshold, loss.variances) == (
        4,
        0.1,
        0.5,
        (0.1, 0.2),
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1, 3, 4]),
)
def test_mining_count_and_finiteness(counts, seed, ratio):
    gen = torch.Generator().manual_seed(seed)
    boxes, labels, mask = random_gt(counts, gen)
    B = len(counts)
    loc = torch.randn(B, N, 4, generator=gen, requires_grad=True)
    logits = torch.randn(B, N, 2, generator=gen, requires_grad=True)
    out = MultiBoxLoss(neg_ratio=ratio)(
        loc, logits, boxes, labels, mask, ANCHORS_CXCYWH, ANCHORS_XYXY
    )
    matched = match_anchors(boxes, mask, ANCHORS_XYXY)
    num_pos = (matched >= 0).sum(1)
    assert torch.equal(out.num_pos, num_pos.float())
    # per image k = min(ratio * pos, neg); an image without GT mines `ratio` as if it had one
    expected = torch.minimum(ratio * num_pos.clamp(min=1), N - num_pos)
    assert torch.equal(out.num_neg, expected.float())
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(loc.grad).all()


def test_batch_without_any_gt_is_finite_and_trains_the_class_head():
    boxes = torch.zeros(2, 1, 4)
    mask = torch.zeros(2, 1, dtype=torch.bool)
    loc = torch.randn(2, N, 4, requires_grad=True)
    logits = torch.randn(2, N, 2, requires_grad=True)
    out = MultiBoxLoss()(loc, logits, boxes, mask.long(), mask, ANCHORS_CXCYWH, ANCHORS_XYXY)
    assert out.box.item() == 0 and torch.isfinite(out.cls) and out.cls > 0
    out.total.backward()
    assert logits.grad.abs().sum() > 0  # mined negatives push toward background
    assert torch.equal(out.num_neg, torch.tensor([4.0, 4.0]))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.loss.neg_ratio"):
        MultiBoxLoss(neg_ratio=0)


@pytest.mark.parametrize("name", ["giou", "diou"])
def test_iou_box_loss_equals_torchvision_on_the_decoded_positives(name):
    gen = torch.Generator().manual_seed(2)
    boxes, labels, mask = random_gt([3, 1], gen)
    loc = 0.5 * torch.randn(2, N, 4, generator=gen)
    logits = torch.randn(2, N, 2, generator=gen)
    out = MultiBoxLoss(box_loss=name, box_weight=2.5)(
        loc, logits, boxes, labels, mask, ANCHORS_CXCYWH, ANCHORS_XYXY
    )
    # reference: torchvision's BoxCoder decodes, torchvision's IoU loss scores
    matched = match_anchors(boxes, mask, ANCHORS_XYXY)
    pos = matched >= 0
    anchors = ANCHORS_XYXY.expand(2, N, 4)[pos]
    pred = TV_CODER.decode_single(loc[pos], anchors)
    gt = boxes.gather(1, matched.clamp(min=0)[..., None].expand(2, N, 4))[pos]
    loss_fn = generalized_box_iou_loss if name == "giou" else distance_box_iou_loss
    expected = 2.5 * loss_fn(pred, gt, reduction="sum") / pos.sum()
    torch.testing.assert_close(out.box, expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["giou", "diou"]),
    st.floats(0.0, 30.0),
)
def test_iou_box_loss_is_finite_with_padding_and_wild_offsets(counts, seed, name, spread):
    # padded GT slots (zero boxes) and offsets far outside the anchors: loss and gradient finite
    gen = torch.Generator().manual_seed(seed)
    boxes, labels, mask = random_gt(counts, gen)
    loc = (spread * torch.randn(len(counts), N, 4, generator=gen)).requires_grad_()
    logits = torch.randn(len(counts), N, 2, generator=gen)
    out = MultiBoxLoss(box_loss=name)(
        loc, logits, boxes, labels, mask, ANCHORS_CXCYWH, ANCHORS_XYXY
    )
    assert torch.isfinite(out.total) and out.box >= 0
    out.total.backward()
    assert torch.isfinite(loc.grad).all()
    if sum(counts) == 0:
        assert out.box.item() == 0


def test_iou_box_loss_gradient_tightens_the_box():
    # one GT matched by anchors whose predicted boxes are off: a step down the gradient raises
    # the IoU of every positive's decoded box with its GT
    gen = torch.Generator().manual_seed(3)
    boxes, labels, mask = random_gt([2], gen)
    loc = (0.3 * torch.randn(1, N, 4, generator=gen)).requires_grad_()
    logits = torch.zeros(1, N, 2)
    loss = MultiBoxLoss(box_loss="giou")
    loss(loc, logits, boxes, labels, mask, ANCHORS_CXCYWH, ANCHORS_XYXY).box.backward()
    matched = match_anchors(boxes, mask, ANCHORS_XYXY)[0]
    pos = matched >= 0
    gt = boxes[0, matched[pos]]

    def ious(offsets):
        pred = TV_CODER.decode_single(offsets[0][pos], ANCHORS_XYXY[pos])
        return box_iou(pred, gt).diagonal()

    with torch.no_grad():
        before, after = ious(loc), ious(loc - 0.05 * loc.grad / loc.grad.abs().max())
    assert (after > before).float().mean() > 0.9


def test_unknown_box_loss_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"model.loss.box_loss='iou'.*smooth_l1, giou, diou"):
        MultiBoxLoss(box_loss="iou")
    with pytest.raises(ValueError, match="model.loss.box_weight"):
        MultiBoxLoss(box_loss="giou", box_weight=0)


def test_box_weight_defaults_to_the_losss_own():
    assert MultiBoxLoss().box_weight == 1.0
    assert MultiBoxLoss(box_loss="giou").box_weight == MultiBoxLoss(box_loss="diou").box_weight == 5
    assert MultiBoxLoss(box_loss="giou", box_weight=2).config["box_weight"] == 2
