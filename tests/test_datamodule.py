"""PennFudanDataModule, collate/Batch, worker seeding, Hydra config and the augmentation figure."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MANIFEST, PENNFUDAN
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler, Subset
from torchvision import tv_tensors

from ssd_lightning.config.paths import load_option
from ssd_lightning.data.batch import Batch, collate_fn
from ssd_lightning.data.download import DownloadError
from ssd_lightning.data.manifest import DatasetIntegrityError, load_json
from ssd_lightning.data.pennfudan_datamodule import PennFudanDataModule
from ssd_lightning.data.presets import build_train_transform
from ssd_lightning.data.sampling import EpochSeededSampler
from ssd_lightning.visualize import figure_to_png, plot_augmentations

CONF = Path(__file__).resolve().parents[1] / "conf"
S = 300
SAFE_CROP = load_option("augmentation", "safe_crop")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dm() -> PennFudanDataModule:
    m = PennFudanDataModule(batch_size=4, num_workers=0, seed=3, augmentation=SAFE_CROP)
    m.prepare_data()
    m.setup("fit")
    return m


def _sample(n_boxes: int, name: str, fallback: int = 0):
    boxes = torch.tensor([[10.0, 20, 50, 120]] * n_boxes).reshape(-1, 4)
    return tv_tensors.Image(torch.rand(3, S, S)), {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(S, S)),
        "labels": torch.ones(n_boxes, dtype=torch.int64),
        "orig_size": torch.tensor([400, 500]),
        "name": name,
        "fallback": fallback,
    }


# -- collate -------------------------------------------------------------------------------------
def test_collate_pads_boxes_with_a_mask():
    b = collate_fn([_sample(2, "a"), _sample(0, "b", 2), _sample(3, "c", 1)])
    assert {f.name for f in dataclasses.fields(Batch)} == {
        "images",
        "boxes",
        "labels",
        "mask",
        "orig_sizes",
        "names",
        "fallback",
        "crowd",  # COCO iscrowd flags of evaluation batches; None without any
    }
    assert b.crowd is None
    assert b.images.shape == (3, 3, S, S) and b.images.dtype == torch.float32
    assert type(b.images) is torch.Tensor and type(b.boxes) is torch.Tensor
    assert b.boxes.shape == (3, 3, 4) and b.labels.shape == (3, 3) and b.mask.dtype == torch.bool
    assert b.mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert (b.boxes[~b.mask] == 0).all() and (b.labels[~b.mask] == 0).all()
    assert (b.labels[b.mask] == 1).all() and b.labels.dtype == torch.int64
    assert b.orig_sizes.tolist() == [[400, 500]] * 3 and b.orig_sizes.dtype == torch.int64
    assert b.names == ["a", "b", "c"] and b.fallback.tolist() == [0, 2, 1] and len(b) == 3


def test_collate_all_empty_has_one_padded_slot_and_moves_with_to():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    b = collate_fn([_sample(0, "a"), _sample(0, "b")])
    assert b.boxes.shape == (2, 1, 4) and not b.mask.any()
    d = b.to(torch.float64)
    assert d.images.dtype == torch.float64 and d.names == ["a", "b"]
    moved = move_data_to_device(b, torch.device("cpu"))  # what Lightning does with a batch
    assert isinstance(moved, Batch) and moved.names == ["a", "b"]


# -- datamodule ----------------------------------------------------------------------------------
def test_setup_uses_the_committed_split(dm):
    split = load_json(CONF.parent / "data" / "pennfudan_split.json")
    assert dm.train_set.names == split["train"] and dm.val_set.names == split["val"]
    assert dm.test_set is dm.val_set


def test_only_augmented_training_samples_read_masks(dm):
    assert dm.train_set.with_masks and "mask_runs" in dm.train_set.raw(0)[1]
    assert not dm.val_set.with_masks  # evaluation boxes are not augmented
    light = PennFudanDataModule(num_workers=0, augmentation=load_option("augmentation", "light"))
    light.setup("fit")
    assert not light.train_set.with_masks  # no crop, no tight boxes


def test_train_batch(dm):
    torch.manual_seed(0)
    b = next(iter(dm.train_dataloader()))
    assert (
        isinstance(b, Batch) and b.images.shape == (4, 3, S, S) and b.images.dtype == torch.float32
    )
    assert b.mask.any(dim=1).all()  # every training sample keeps a box
    assert (b.boxes[b.mask] >= 0).all() and (b.boxes[b.mask] <= S).all()
    assert b.fallback.shape == (4,) and b.fallback.dtype == torch.int64


def test_val_batch_is_resized_ground_truth(dm):
    b = next(iter(dm.val_dataloader()))
    name = b.names[0]
    raw = dm.val_set.raw(dm.val_set.names.index(name))[1]["boxes"].as_subclass(torch.Tensor)
    h, w = b.orig_sizes[0].tolist()
    scale = torch.tensor([S / w, S / h, S / w, S / h])
    torch.testing.assert_close(b.boxes[0][b.mask[0]], raw * scale)
    assert (b.fallback == 0).all()


def test_val_size_zero_trains_on_all_170():
    m = PennFudanDataModule(val_size=0, num_workers=0, preload=False)
    with pytest.warns(UserWarning, match="val_size=0"):
        m.setup("fit")
    assert len(m.train_set) == 170 and m.val_dataloader() == [] and len(m.test_set) == 170


def test_other_val_size_is_a_subset_of_the_committed_validation():
    m = PennFudanDataModule(val_size=20, num_workers=0, preload=False)
    m.setup("fit")
    assert len(m.val_set) == 20 and len(m.train_set) == 150
    assert set(m.val_set.names) <= set(
        load_json(CONF.parent / "data" / "pennfudan_split.json")["val"]
    )


def test_bad_manifest_names_the_file(tmp_path):
    man = load_json(MANIFEST)
    man["files"][5]["size"] += 1
    bad = tmp_path / "manifest.json"
    bad.write_text(__import__("json").dumps(man))
    m = PennFudanDataModule(manifest=bad, num_workers=0)
    with pytest.raises(DatasetIntegrityError, match=man["files"][5]["path"].split("/")[-1]):
        m.prepare_data()
    with pytest.raises(ValueError, match="data.verify"):
        PennFudanDataModule(verify="sometimes")


def test_prepare_data_downloads_into_missing_root_and_fails_fast_offline(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror("offline"))
    )
    m = PennFudanDataModule(root=tmp_path / "PennFudanPed", download=True, download_timeout=1.0)
    with pytest.raises(DownloadError, match="offline"):
        m.prepare_data()


def test_two_workers_draw_different_augmentations():
    m = PennFudanDataModule(batch_size=1, num_workers=2, seed=0, augmentation=SAFE_CROP)
    m.setup("fit")
    # the same image four times, one per batch, no shuffle: workers 0 and 1 alternate batches
    loader = m._loader(Subset(m.train_set, [0, 0, 0, 0]), train=False)
    batches = list(loader)
    a, b = batches[0], batches[1]  # first batch of worker 0 and of worker 1
    assert not torch.equal(a.images, b.images) or not torch.equal(a.boxes, b.boxes)
    again = list(loader)  # the next epoch draws differently too
    assert not torch.equal(batches[0].images, again[0].images)


def test_datamodule_loader_settings():
    m = PennFudanDataModule(
        num_workers=2,
        persistent_workers=True,
        pin_memory=False,
        batch_size=5,
        preload=False,
        seed=None,
    )
    m.setup()
    dl = m.train_dataloader()
    assert (
        dl.num_workers == 2
        and dl.persistent_workers
        and dl.batch_size == 5
        and dl.generator is None
    )


def test_validation_under_ddp_sees_each_image_once(dm):
    # 50 validation images on 4 ranks: 13 + 13 + 12 + 12, none twice (a padding sampler: 52)
    shares = []
    for rank in range(4):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=4)
        try:
            loader = dm.val_dataloader()
        finally:
            dm.trainer = None
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it
        shares.append(list(loader.sampler))
    assert sorted(i for share in shares for i in share) == list(range(50))
    assert [len(share) for share in shares] == [13, 13, 12, 12]


# -- Hydra config --------------------------------------------------------------------------------
@pytest.mark.parametrize("aug", ["safe_crop", "light", "none", "iou_crop"])
def test_hydra_config_instantiates_the_datamodule(aug):
    from hydra.utils import instantiate

    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(CONF.parent / "data")},
            "model": {"net": {"image_size": S}},
            "seed": 5,
            "augmentation": OmegaConf.load(CONF / "augmentation" / f"{aug}.yaml"),
            "data": OmegaConf.load(CONF / "data" / "pennfudan.yaml"),
        }
    )
    m = instantiate(cfg.data)
    assert isinstance(m, PennFudanDataModule) and m.seed == 5 and m.image_size == S
    assert m.augmentation["name"] == aug and isinstance(m.augmentation, dict)
    build_train_transform(m.augmentation, S)


# -- figure --------------------------------------------------------------------------------------
def test_augmentation_figure_renders(dm, tmp_path):
    fig = plot_augmentations(dm.train_set, n=4, index=3, seed=0)
    assert len([ax for ax in fig.axes if ax.images]) == 4
    png = figure_to_png(fig, tmp_path / "fig" / "aug.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = dm.train_set.raw(0)
    fig2 = plot_augmentations(raw, transform=build_train_transform(SAFE_CROP, S), n=3)
    assert len([ax for ax in fig2.axes if ax.images]) == 3
    with pytest.raises(ValueError, match="transform"):
        plot_augmentations(raw)


def test_split_null_evaluates_every_image_of_another_root(tmp_path: Path) -> None:
    import shutil

    from ssd_lightning.data.manifest import mask_name

    root = tmp_path / "my_peds"
    names = ["FudanPed00001.png", "PennPed00005.png", "PennPed00010.png"]
    for sub, files in (("PNGImages", names), ("PedMasks", [mask_name(n) for n in names])):
        (root / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(Path(PENNFUDAN) / sub / f, root / sub / f)
    m = PennFudanDataModule(root=root, split=None, verify="none", batch_size=2, num_workers=0)
    m.setup("validate")
    assert m.train_set is None  # evaluation decodes no training set
    assert sorted(m.val_set.names) == names
    batches = list(m.val_dataloader())
    assert sum(len(b) for b in batches) == 3


def test_resumed_epochs_continue_the_data_stream() -> None:
    def epoch(sampler: EpochSeededSampler, e: int) -> list[tuple[int, int]]:
        sampler.set_epoch(e)
        return list(sampler)  # (index, augmentation seed) pairs

    run = EpochSeededSampler(120, 7)
    history = [epoch(run, e) for e in range(4)]
    resumed = EpochSeededSampler(120, 7)  # a fresh process after epoch 1
    assert epoch(resumed, 2) == history[2]
    assert history[0] != history[1] != history[2]
    assert sorted(i for i, _ in history[1]) == list(range(120))
    stopped = EpochSeededSampler(120, 7)  # stopped after 40 samples of epoch 2
    stopped.resume_at(2, 40)
    assert epoch(stopped, 2) == history[2][40:]
    assert epoch(stopped, 3) == history[3]  # the skip applies to that epoch only
    # DDP: the ranks share one epoch order, each sample exactly once, with the same seeds
    shares = [epoch(EpochSeededSampler(120, 7, num_replicas=2, rank=r), 1) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(history[1])


def test_training_batches_do_not_depend_on_the_workers() -> None:
    """Every sample's augmentation is seeded from (seed, epoch, index): the same batches with no
    worker (the main process augments) and with two."""
    batches = {}
    for workers in (0, 2):
        m = PennFudanDataModule(
            batch_size=2, num_workers=workers, seed=3, augmentation=SAFE_CROP, preload=False
        )
        m.setup("fit")
        loader = m.train_dataloader()
        loader.sampler.set_epoch(1)
        it = iter(loader)
        batches[workers] = [next(it) for _ in range(3)]
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a.names == b.names
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)
