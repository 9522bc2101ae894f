"""Box coding: round trip, torchvision equivalence and the exp guard."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_convert

from ssd_lightning.core.box_coding import decode, encode


def _random_cxcywh(n, gen):
    xy = torch.rand(n, 2, generator=gen)
    wh = torch.rand(n, 2, generator=gen) * 0.9 + 0.05  # size ratios stay inside the exp guard
    return torch.cat([xy, wh], 1).double()


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_decode_inverts_encode(n, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes, anchors = _random_cxcywh(n, gen), _random_cxcywh(n, gen)
    torch.testing.assert_close(decode(encode(boxes, anchors), anchors), boxes)


def test_encode_equals_torchvision_boxcoder():
    gen = torch.Generator().manual_seed(0)
    boxes, anchors = _random_cxcywh(100, gen), _random_cxcywh(100, gen)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    ours = encode(boxes, anchors)
    theirs = coder.encode_single(xyxy(boxes), xyxy(anchors))
    torch.testing.assert_close(ours, theirs)
    decoded = coder.decode_single(theirs, xyxy(anchors))
    torch.testing.assert_close(xyxy(decode(ours, anchors)), decoded)


def test_decode_guards_exp_against_overflow():
    anchors = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    out = decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchors)
    assert torch.isfinite(out).all()
    assert out[0, 2] <= 0.1 * 1000 / 16 + 1e-4
