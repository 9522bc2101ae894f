"""The GPU data path against the CPU reference: identical boxes for the same random draws, images
that agree within a small tolerance, and the batched photometric ops against torchvision's."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PENNFUDAN
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ssd_lightning.config.paths import load_option
from ssd_lightning.data.batch import plan_collate
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.gpu.pixels import GpuAugmenter, photometric
from ssd_lightning.data.gpu.plan import PHOTO_SLOTS, GpuPlanDataset, unplannable_steps
from ssd_lightning.data.gpu.record import NoGpuKernel
from ssd_lightning.data.pennfudan_datamodule import PennFudanDataModule
from ssd_lightning.data.presets import build_fallbacks, build_train_transform, needs_masks
from ssd_lightning.data.transforms import ResizeKeepLargest

SAFE_CROP = load_option("augmentation", "safe_crop")

S = 160  # smaller than 300 to keep the test fast; the code paths are the same
NAMES = sorted(p.name for p in (PENNFUDAN / "PNGImages").glob("*.png"))[:12]


def _pair(aug=SAFE_CROP, transforms=None, fallbacks=None):
    if transforms is None:
        transforms, fallbacks = build_train_transform(aug, S), build_fallbacks(aug, S)
    cpu = PennFudanDataset(
        PENNFUDAN,
        NAMES,
        transforms=transforms,
        fallbacks=fallbacks or [],
        skip_empty=True,
        with_masks=needs_masks(aug),
    )
    return cpu, GpuPlanDataset(cpu), GpuAugmenter(cpu)


def _draw(cpu, gpu, aug, seeds):
    """Same seed -> CPU sample and GPU-path sample (pixels done on the CPU device here)."""
    out = []
    for seed in seeds:
        i = seed % len(cpu)
        torch.manual_seed(seed)
        img, t = cpu[i]
        torch.manual_seed(seed)
        plan, t2 = gpu[i]
        batch = aug(plan_collate([(plan, t2)]))
        out.append((img, t, plan, t2, batch))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, mean_tol: float, q99_tol: float) -> float:
    d = (a - b).abs()
    assert d.mean() < mean_tol, float(d.mean())
    assert d.flatten().quantile(0.99) < q99_tol, float(d.flatten().quantile(0.99))
    return float(d.mean())


def test_same_boxes_and_close_images_safe_crop() -> None:
    cpu, gpu, aug = _pair()
    # the same pipeline without the instance masks: boxes as the geometry alone leaves them
    boxes_only = PennFudanDataset(PENNFUDAN, NAMES, cpu.transforms, cpu.fallbacks, True)
    flips = crops = photos = tightened = 0
    means = []
    for seed, (img, t, plan, t2, batch) in enumerate(_draw(cpu, gpu, aug, range(36))):
        torch.manual_seed(seed)
        tightened += not torch.equal(boxes_only[seed % len(cpu)][1]["boxes"], t["boxes"])
        # boxes, labels and fallback stage: the same code ran on the same draws -> identical
        assert torch.equal(t["boxes"], t2["boxes"])
        assert torch.equal(t["labels"], t2["labels"])
        assert t["fallback"] == t2["fallback"]
        assert torch.equal(batch.boxes[0, : len(t["boxes"])], t["boxes"].as_subclass(torch.Tensor))
        assert batch.images.shape == (1, 3, S, S) and batch.images.dtype == torch.float32
        assert batch.images.min() >= 0 and batch.images.max() <= 1
        # pixels: uint8 CPU path (antialiased bilinear resize, truncation after each photometric
        # op) vs float roi_align path (box-averaged bilinear samples): a few 1/255 on average
        means.append(_close(batch.images[0], img, mean_tol=0.02, q99_tol=0.12))
        flips += plan.flip
        crops += plan.roi != (0.0, 0.0, float(t["orig_size"][1]), float(t["orig_size"][0]))
        photos += plan.photo != (1.0, 1.0, 1.0, 0.0, 1.0) or plan.perm != (0, 1, 2)
    assert flips and crops and photos  # every kind of operation was exercised
    assert tightened  # the masks were planned too: some boxes are tighter than the geometry's
    assert sum(means) / len(means) < 0.01


def test_geometry_only() -> None:
    """Without photometric work only the resampling filters differ."""
    aug_cfg = {**SAFE_CROP, "photometric": None}
    cpu, gpu, aug = _pair(aug_cfg)
    for img, t, _, t2, batch in _draw(cpu, gpu, aug, range(12)):
        assert torch.equal(t["boxes"], t2["boxes"])
        _close(batch.images[0], img, mean_tol=0.015, q99_tol=0.1)


def test_fallback_stages_match() -> None:
    """A crop step that always loses every box forces fallback 1; if stage 1 loses them too,
    stage 2 (resize-only, largest box) runs - in both paths identically."""
    drop_all = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(0.5),
            v2.Resize((S, S)),
            v2.SanitizeBoundingBoxes(min_size=10_000),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    keep = build_train_transform(None, S, with_crop=False)
    for fallbacks, stage in (
        ([keep, ResizeKeepLargest(S)], 1),
        ([drop_all, ResizeKeepLargest(S)], 2),
    ):
        cpu, gpu, aug = _pair(transforms=drop_all, fallbacks=fallbacks)
        for img, t, _, t2, batch in _draw(cpu, gpu, aug, range(4)):
            assert t["fallback"] == t2["fallback"] == stage
            assert torch.equal(t["boxes"], t2["boxes"]) and len(t2["boxes"]) >= 1
            _close(batch.images[0], img, mean_tol=0.02, q99_tol=0.12)


def test_batch_of_many_samples() -> None:
    cpu, gpu, aug = _pair()
    torch.manual_seed(0)
    samples = [gpu[i] for i in range(len(gpu))]
    pb = plan_collate(samples)
    batch = aug(pb)
    assert batch.images.shape == (len(gpu), 3, S, S)
    assert batch.mask.sum(1).min() >= 1
    assert torch.equal(pb.index, torch.arange(len(gpu)))
    assert pb.to("cpu").rois.shape == (len(gpu), 4)
    # each sample as a batch of one gives the same pixels as inside the big batch
    one = aug(plan_collate([samples[3]]))
    torch.testing.assert_close(one.images[0], batch.images[3])
    # what data.gpu_augment=auto weighs against the GPU's free memory is the store it builds
    assert aug.store_bytes() == aug.store.numel() * aug.store.element_size()


def test_photometric_matches_torchvision_float_kernels() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 24, 20, generator=gen)
    photo = torch.tensor(
        [
            [1.1, 0.7, 1.3, 0.04, 1.0],
            [0.9, 1.0, 1.0, 0.0, 1.4],
            [1.0, 1.0, 0.6, -0.05, 1.0],
            [1.0, 1.2, 1.0, 0.0, 1.0],
            [1.0, 1.0, 1.0, 0.0, 1.0],
            [0.88, 1.0, 1.45, -0.02, 0.6],
        ]
    )
    perm = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [0, 1, 2], [1, 0, 2]])
    got = photometric(x, photo, perm)
    for i in range(len(x)):
        b, cb, s, h, ca = photo[i].tolist()
        ref = F.adjust_brightness(x[i], b)
        ref = F.adjust_contrast(ref, cb)
        ref = F.adjust_saturation(ref, s)
        ref = F.adjust_hue(ref, h)
        ref = F.adjust_contrast(ref, ca)
        ref = F.permute_channels(ref, perm[i].tolist())
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
    assert PHOTO_SLOTS[3] == "hue"
    # identity factors leave the image bit-exact
    ident = photometric(x, torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]] * 6), perm[[0] * 6])
    assert torch.equal(ident, x)


def test_unsupported_step_is_a_clear_error() -> None:
    pad = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomZoomOut(p=1.0, side_range=(1.5, 2.0)),
            v2.Resize((S, S)),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    assert unplannable_steps(pad) == ["RandomZoomOut"]
    gpu = GpuPlanDataset(PennFudanDataset(PENNFUDAN, NAMES[:1], transforms=pad))
    with pytest.raises(NoGpuKernel, match="gpu_augment=false"):
        gpu[0]


def test_every_shipped_preset_but_zoom_out_is_plannable() -> None:
    for name in ("safe_crop", "light", "none"):
        assert unplannable_steps(build_train_transform(load_option("augmentation", name), S)) == []
    iou_crop = build_train_transform(load_option("augmentation", "iou_crop"), S)
    assert unplannable_steps(iou_crop) == ["RandomZoomOut"]


def test_datamodule_falls_back_to_the_cpu_path_with_a_log_line(caplog) -> None:
    dm = PennFudanDataModule(
        augmentation=load_option("augmentation", "iou_crop"),
        num_workers=0,
        gpu_augment=True,
        preload=False,
    )
    with caplog.at_level(logging.INFO):
        assert not dm._use_gpu_path()
    assert "RandomZoomOut" in caplog.text and "CPU data path" in caplog.text
    assert PennFudanDataModule(num_workers=0, gpu_augment=True, preload=False)._use_gpu_path()
    with pytest.raises(ValueError, match="data.gpu_augment"):
        PennFudanDataModule(gpu_augment="yes")


def test_datamodule_gpu_augment_option_in_a_lightning_fit() -> None:
    """data.gpu_augment=true: the train loader yields PlanBatch, Lightning moves it to the
    device, the DataModule's ``on_after_batch_transfer`` turns it into a Batch."""
    import lightning as L

    from ssd_lightning.core.ssd import SSD
    from ssd_lightning.training.lit_module import SSDLitModule

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((type(batch).__name__, tuple(batch.images.shape)))

    net = SSD(load_option("anchors", "tall_skinny"), image_size=128, weights="none")
    dm = PennFudanDataModule(
        image_size=128, batch_size=2, num_workers=0, val_size=0, gpu_augment=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Spy()],
    )
    trainer.fit(SSDLitModule(net), datamodule=dm)
    assert seen == [("Batch", (2, 3, 128, 128))] * 2
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
