"""Backbone weights (local file, ImageNet cache, offline fallback) and model export/load."""

import time

import pytest
import torch
from torchvision.models import resnet34

from ssd_lightning.config.paths import load_option
from ssd_lightning.core import backbone
from ssd_lightning.core.ssd import SSD
from ssd_lightning.training.checkpoint import export_model, load_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub cache and no network: the probe must say so at once."""
    monkeypatch.setattr(backbone, "_imagenet_cache_file", lambda: tmp_path / "missing.pth")
    monkeypatch.setattr(backbone, "_reachable", lambda *a, **k: False)


def test_weights_from_a_local_file(tmp_path):
    reference = resnet34()
    path = tmp_path / "r34.pth"
    torch.save(reference.state_dict(), path)
    model = SSD(load_option("anchors", "ssd"), weights=str(path), image_size=128)
    torch.testing.assert_close(
        model.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight
    )
    torch.testing.assert_close(model.backbone.stem[0].weight, reference.conv1.weight)
    assert model.weights_source == f"file ({path})"


def test_imagenet_weights_come_from_the_hub_cache(monkeypatch, tmp_path):
    reference = resnet34()
    cached = tmp_path / "resnet34-b627a593.pth"
    torch.save(reference.state_dict(), cached)
    monkeypatch.setattr(backbone, "_imagenet_cache_file", lambda: cached)
    monkeypatch.setattr(backbone, "_reachable", lambda *a, **k: pytest.fail("no network needed"))
    model = SSD(load_option("anchors", "ssd"), weights="imagenet", image_size=128)
    torch.testing.assert_close(
        model.backbone.layer4[2].conv2.weight, reference.layer4[2].conv2.weight
    )
    assert model.weights_source.startswith("imagenet")


def test_auto_falls_back_to_random_init_loudly_when_offline(offline):
    with pytest.warns(UserWarning, match="RANDOM INIT"):
        model = SSD(load_option("anchors", "ssd"), weights="auto", image_size=128)
    assert model.weights_source.startswith("none (auto")


def test_imagenet_offline_is_a_clear_error(offline):
    with pytest.raises(RuntimeError, match="model.net.weights=imagenet.*model.net.weights=none"):
        SSD(load_option("anchors", "ssd"), weights="imagenet", image_size=128)


def test_real_probe_never_hangs():
    # Whatever this machine's network does, the probe answers within its timeout.
    start = time.monotonic()
    backbone._reachable(timeout=2.0)
    assert time.monotonic() - start < 10


def test_bad_weights_values_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.net.weights=nope.*auto \\| imagenet \\| none"):
        SSD(load_option("anchors", "ssd"), weights="nope", image_size=128)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        SSD(load_option("anchors", "ssd"), weights=str(junk), image_size=128)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a torchvision ResNet-34 state dict"):
        SSD(load_option("anchors", "ssd"), weights=str(wrong), image_size=128)


def test_export_and_load_round_trip(tmp_path):
    model = SSD(
        load_option("anchors", "dense_tall"), weights="none", image_size=160, head_kernel_size=3
    ).eval()
    path = export_model(model, tmp_path / "best.pt", extra={"epoch": 3})
    loaded, info = load_model(path)
    assert loaded.config == model.config and info["epoch"] == 3
    assert torch.load(path, weights_only=True)["epoch"] == 3
    x = torch.rand(2, 3, 160, 160)
    for a, b in zip(model(x), loaded(x), strict=True):
        torch.testing.assert_close(a, b)


def test_head_kernel_size_is_validated():
    with pytest.raises(ValueError, match="head_kernel_size=2: allowed values are 1 or 3"):
        SSD(load_option("anchors", "ssd"), weights="none", image_size=128, head_kernel_size=2)
