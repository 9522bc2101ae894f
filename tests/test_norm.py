"""SafeBatchNorm2d: nn.BatchNorm2d wherever that works, and training on one value per channel."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssd_lightning.core.norm import SafeBatchNorm2d


def _pair(channels: int) -> tuple[nn.BatchNorm2d, SafeBatchNorm2d]:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(channels)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    safe = SafeBatchNorm2d(channels)
    safe.load_state_dict(ref.state_dict())  # the same keys
    return ref, safe


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 5),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    training=st.booleans(),
)
def test_same_as_batchnorm_where_batchnorm_works(n, c, h, w, training) -> None:
    if training and n * h * w == 1:
        return  # nn.BatchNorm2d raises there: see the next test
    ref, safe = _pair(c)
    ref.train(training), safe.train(training)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n * 100 + h * 10 + w))
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, ys = ref(xr), safe(xs)
    torch.testing.assert_close(ys, yr)
    yr.square().sum().backward()
    ys.square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(safe.weight.grad, ref.weight.grad)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(safe.state_dict()[k], v, msg=k)


def test_one_value_per_channel_trains_with_the_running_statistics() -> None:
    ref, safe = _pair(4)
    before = copy.deepcopy(safe.state_dict())
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.train()(x)  # what SafeBatchNorm2d is for
    y = safe.train()(x)
    torch.testing.assert_close(y, ref.eval()(x))  # normalized like eval mode
    for k, v in before.items():  # running statistics and the batch counter untouched
        torch.testing.assert_close(safe.state_dict()[k], v, msg=k)
    y.sum().backward()
    assert safe.weight.grad is not None and safe.weight.grad.abs().sum() > 0
    assert safe.bias.grad is not None
