"""The moving average of the weights (``model.ema_decay``): the arithmetic, against torch's
``AveragedModel``, and what a run does with it (validated, exported, read back, resumed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cfg, tiny
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ssd_lightning.training.checkpoint import load_model, net_state, read_checkpoint
from ssd_lightning.training.ema import EMA, ema_decay_at, masked_lerp_


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


@given(decay=st.floats(0.5, 0.99999), step=st.integers(1, 10**7))
def test_decay_warms_up_to_the_configured_value(decay: float, step: int) -> None:
    d = ema_decay_at(decay, step)
    assert 0.0 < d <= decay
    assert d <= ema_decay_at(decay, step + 1)  # never decreasing
    assert ema_decay_at(decay, 10**9) == pytest.approx(decay)


def test_update_matches_torch_averaged_model() -> None:
    """Past the warm-up, one update is torch's EMA update (weights and BatchNorm statistics)."""
    decay = 0.9
    net = _small_net()
    ema = EMA(net, decay)
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    reference.update_parameters(net)  # torch's first update copies, as EMA's constructor does
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(1000, 1005):  # the warm-up is over: the configured decay
        loss = net(torch.randn(2, 3, 8, 8)).square().mean()  # also moves the BN statistics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(net, step)
        reference.update_parameters(net)
    expected = reference.module.state_dict()
    for k, v in ema.net.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k], msg=k)
        else:  # BN's batch counter is copied, not averaged
            assert torch.equal(v, net.state_dict()[k]), k
    assert not any(p.requires_grad for p in ema.net.parameters())


def test_a_constant_network_is_its_own_average() -> None:
    net = _small_net()
    ema = EMA(net, 0.99)
    for step in range(1, 20):
        ema.update(net, step)
    for k, v in ema.net.state_dict().items():
        torch.testing.assert_close(v, net.state_dict()[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("skipped", [0.0, 1.0])
def test_the_device_update_is_a_lerp_or_nothing(skipped: float) -> None:
    """The GPU's update (the skip folded into the arithmetic) against a lerp / no change."""
    gen = torch.Generator().manual_seed(0)
    avg = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    new = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    expected = [a.clone() for a in avg]
    if not skipped:
        torch._foreach_lerp_(expected, new, 0.25)
    masked_lerp_(avg, new, 0.25, torch.tensor(skipped))
    for a, e in zip(avg, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0 if skipped else 1e-6, atol=0 if skipped else 1e-7)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, "0.9"])
def test_bad_decay_names_the_key(decay: object) -> None:
    with pytest.raises(ValueError, match=r"model\.ema_decay=.*allowed values"):
        EMA(_small_net(), decay)  # type: ignore[arg-type]


def _ema_run(out: Path, *extra: str, epochs: int) -> dict:
    from ssd_lightning.train import train

    return train(
        make_cfg(
            # a constant lr: a schedule over 1 epoch is not the first half of one over 2
            tiny("model.ema_decay=0.9", "scheduler=none", *extra, trainer__max_epochs=epochs),
            out,
        )
    )


def test_a_run_validates_exports_and_resumes_the_average(tmp_path: Path) -> None:
    """With an average, it is the network the run validates and exports, the one evaluate and
    predict read from a .ckpt, and a resumed run continues it exactly."""
    from ssd_lightning.training.lit_module import SSDLitModule

    first = tmp_path / "first"  # one epoch: its best export is its final state
    _ema_run(first, epochs=1)
    blob = read_checkpoint(first / "checkpoints" / "last.ckpt")
    state = blob["state_dict"]
    ema = {k[len("ema.net.") :]: v for k, v in state.items() if k.startswith("ema.net.")}
    raw = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    assert ema.keys() == raw.keys() and blob["ssd_lightning"]["ema"] is True
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # an average, not a copy
    assert all(torch.equal(net_state(blob)[k], ema[k]) for k in ema)  # what a .ckpt gives
    exported = read_checkpoint(first / "ssd_resnet34_best.pt")["state_dict"]
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    # resumed after the first epoch: the same network and average as a straight 2-epoch run
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ema_run(straight, epochs=2)
    _ema_run(resumed, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", epochs=2)
    want = read_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    got = read_checkpoint(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    for k, v in want.items():
        if k.startswith(("ema.net.", "net.")):
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the optimizer trains the network only, not its frozen average
    module = SSDLitModule(load_model(first / "ssd_resnet34_best.pt")[0], ema_decay=0.9)
    optimizer = module.configure_optimizers()
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in module.net.parameters()}


@pytest.mark.parametrize(("before", "after"), [("null", "0.9"), ("0.9", "null")])
def test_a_checkpoint_continues_with_or_without_an_average(
    tmp_path: Path, before: str, after: str
) -> None:
    """ckpt_path= from a run without a moving average into one with it (it starts from the
    checkpoint's weights), and the other way round (the average is left out)."""
    from ssd_lightning.train import train

    first = tmp_path / "first"
    train(make_cfg(tiny(f"model.ema_decay={before}"), first))
    last = first / "checkpoints" / "last.ckpt"
    metrics = train(
        make_cfg(
            tiny(f"model.ema_decay={after}", f"ckpt_path={last}", trainer__max_epochs=2),
            tmp_path / "second",
        )
    )
    assert metrics["status"] == "completed" and metrics["global_step"] == 4
    state = read_checkpoint(tmp_path / "second" / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("ema.net.") for k in state) == (after != "null")
