"""Figures: each renders to a non-empty PNG of the expected size for a tiny model; the matching
figure shows what the loss's matcher decides; the PredictionImages callback writes the PNGs, the
TensorBoard grids and figures of a (synthetic, 64 px) training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_lightning.config.paths import load_option
from ssd_lightning.core.matching import match_anchors
from ssd_lightning.core.ssd import SSD
from ssd_lightning.visualize import (
    _anchor_levels,
    figure_to_png,
    plot_feature_maps,
    plot_matching,
    plot_predictions,
)

S = 128
DPI = 50


@pytest.fixture(scope="module")
def model() -> SSD:
    torch.manual_seed(0)
    return SSD(load_option("anchors", "tall_skinny"), weights="none", image_size=S).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(0))  # (B,3,S,S) [0,1]


GT = torch.tensor([[10.0, 20.0, 40.0, 120.0], [60.0, 10.0, 100.0, 90.0]])  # xyxy input pixels


def _check_png(path: Path, fig_size: tuple[float, float], dpi: int = DPI) -> np.ndarray:
    """The PNG exists, has the figure's size in pixels and is not a blank canvas."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(fig_size[0] * dpi), round(fig_size[1] * dpi))
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 5  # something was drawn
    return arr


def test_feature_maps_png(model: SSD, images: torch.Tensor, tmp_path: Path) -> None:
    model.train()
    fig = plot_feature_maps(model, images[0], figsize=(12, 6))
    assert model.training  # mode restored
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    shapes = [f"256×{h}×{w}" for h, w in model.feature_sizes]
    assert len(model.feature_sizes) == 6
    for k, shape in enumerate(shapes, start=1):
        assert any(t == f"map {k}: {shape}" for t in titles), (shape, titles)
    _check_png(figure_to_png(fig, tmp_path / "fm.png", dpi=DPI), (12, 6))
    model.eval()


def test_feature_maps_rejects_a_batch(model: SSD, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one image"):
        plot_feature_maps(model, images)


def test_predictions_png(model: SSD, images: torch.Tensor, tmp_path: Path) -> None:
    dets = model.detect(images, score_threshold=0.0, top_k=5)  # boxes in the images' pixels
    assert all(len(d["boxes"]) == 5 for d in dets)
    assert all(float(d["boxes"].max()) <= S for d in dets)  # network-input pixels
    targets = [GT, {"boxes": GT, "mask": torch.tensor([True, False])}, None]
    fig = plot_predictions(images, dets, targets, ncols=2, panel_size=3.0)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["5 pred, 2 GT", "5 pred, 1 GT", "5 pred"]
    _check_png(figure_to_png(fig, tmp_path / "pred.png", dpi=DPI), (6.0, 6.0))


def test_predictions_original_sizes_and_no_boxes(tmp_path: Path) -> None:
    """Images of different sizes (e.g. original photos) and empty detections draw fine."""
    imgs = [
        torch.randint(0, 255, (3, 90, 160), dtype=torch.uint8),
        torch.randint(0, 255, (3, 200, 120), dtype=torch.uint8),
    ]
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    fig = plot_predictions(imgs, [empty, empty], [GT[:1], torch.zeros(0, 4)], names=["a", "b"])
    _check_png(figure_to_png(fig, tmp_path / "p.png", dpi=DPI), (6.0, 3.0))
    with pytest.raises(ValueError, match="2 images but 1 detections"):
        plot_predictions(imgs, [empty])


def test_matching_png_shows_the_matchers_positives(
    model: SSD, images: torch.Tensor, tmp_path: Path
) -> None:
    fig = plot_matching(model, images[0], GT, figsize=(6, 6.5))
    scale = torch.tensor([S, S, S, S], dtype=torch.float32)
    matched = match_anchors(
        (GT / scale)[None], torch.ones(1, 2, dtype=torch.bool), model.anchors_xyxy
    )[0]
    levels = _anchor_levels(model)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for k in range(2):
        pos = matched == k
        assert int(pos.sum()) >= 1  # forced best anchor at least
        per_map = ", ".join(str(c) for c in torch.bincount(levels[pos], minlength=6).tolist())
        assert legend[k] == f"GT {k}: {int(pos.sum())} positive anchors (per map: {per_map})"
    arr = _check_png(figure_to_png(fig, tmp_path / "match.png", dpi=DPI), (6, 6.5))
    # both GT colours (tab10 blue and orange) appear in the drawing
    for rgb in [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]:
        assert (np.abs(arr.astype(int) - rgb).sum(-1) < 30).any(), rgb


def test_matching_with_plain_anchors_and_no_gt(model: SSD, tmp_path: Path) -> None:
    img = torch.rand(3, S, S)
    fig = plot_matching(model.anchors_xyxy, img, GT[:1], figsize=(4, 4))
    _check_png(figure_to_png(fig, tmp_path / "m1.png", dpi=DPI), (4, 4))
    fig = plot_matching(model, img, torch.zeros(0, 4), figsize=(4, 4))
    assert "0 of" in fig.axes[0].get_title()
    _check_png(figure_to_png(fig, tmp_path / "m0.png", dpi=DPI), (4, 4))


# -- the training-run callback -------------------------------------------------------------------


def _synthetic_loader(n: int = 2, size: int = 64) -> torch.utils.data.DataLoader:
    from ssd_lightning.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    batches = [
        Batch(
            images=torch.rand(2, 3, size, size, generator=g),
            boxes=torch.tensor([[[10.0, 4.0, 30.0, 60.0]], [[30.0, 10.0, 50.0, 50.0]]]),
            labels=torch.ones(2, 1, dtype=torch.int64),
            mask=torch.ones(2, 1, dtype=bool),
            orig_sizes=torch.tensor([[size, size]] * 2),
            names=["a", "b"],
            fallback=torch.zeros(2, dtype=torch.int64),
        )
        for _ in range(n)
    ]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_prediction_images_write_pngs_and_tensorboard(tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator as ea

    from ssd_lightning.training.callbacks import PredictionImages
    from ssd_lightning.training.lit_module import SSDLitModule

    torch.manual_seed(0)
    net = SSD(load_option("anchors", "tall_skinny"), image_size=64, weights="none")
    cb = PredictionImages(dirpath=tmp_path / "run", every_n_epochs=1, max_images=2, dpi=DPI)
    tb = TensorBoardLogger(str(tmp_path / "run"), name="tensorboard", version="")
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=tb,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        SSDLitModule(net),
        train_dataloaders=_synthetic_loader(),
        val_dataloaders=_synthetic_loader(1),
    )
    assert cb._source == "val"
    fm = _check_png(tmp_path / "run" / "feature_maps.png", (12, 6))
    pred = _check_png(tmp_path / "run" / "predictions.png", (6, 3))
    assert fm.shape[:2] == (300, 600) and pred.shape[:2] == (150, 300)
    acc = ea.EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    # the grid every epoch (steps 2 and 4), the figures once at the end of the fit
    assert [e.step for e in acc.Images("val/predictions")] == [2, 4]
    for tag in ("figures/feature_maps", "figures/predictions"):
        assert tag in acc.Tags()["images"], acc.Tags()["images"]
        assert [e.step for e in acc.Images(tag)] == [4]


def test_prediction_images_without_validation_or_logger(tmp_path: Path) -> None:
    import lightning as L

    from ssd_lightning.training.callbacks import PredictionImages
    from ssd_lightning.training.lit_module import SSDLitModule

    net = SSD(load_option("anchors", "ssd"), image_size=64, weights="none")
    cb = PredictionImages(max_images=1, dpi=DPI)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(SSDLitModule(net), train_dataloaders=_synthetic_loader(1))
    assert cb._source == "train"
    assert sorted(p.name for p in cb.written) == ["feature_maps.png", "predictions.png"]
    _check_png(tmp_path / "predictions.png", (3, 3))
    with pytest.raises(ValueError, match="callbacks.prediction_images.every_n_epochs"):
        PredictionImages(every_n_epochs=0)
