"""`PennFudanDataModule`: verified vendored data, committed split, v2 pipelines, padded batches.

Batches are `collate.Batch`: images (B,3,S,S) float [0,1], boxes (B,G,4) xyxy in network-input
pixels [0,S] (train: after augmentation; val/test: resized ground truth), orig_sizes (H,W).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ssd_lightning.data.collate import collate_fn
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.download import URL, download_pennfudan
from ssd_lightning.data.gpu_augment import (
    GpuAugmenter,
    PlanBatch,
    GpuPlanDataset,
    gpu_augment_enabled,
    plan_collate,
)
from ssd_lightning.data.manifest import (
    DEFAULT_MANIFEST,
    DEFAULT_ROOT,
    DEFAULT_SPLIT,
    list_image_names,
    split_names,
    verify_dataset,
)
from ssd_lightning.plain import to_plain
from ssd_lightning.data.transforms import (
    build_eval_transform,
    build_fallbacks,
    build_train_transform,
)

_VERIFY = ("quick", "full", "none")


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn. torch already gives each worker base_seed + worker_id (and the
    base seed changes every epoch); seed `random`/numpy from it too so nothing repeats."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global RNG is what third-party code uses


class EpochSeededSampler(Sampler[int]):
    """Shuffles epoch e from ``seed + e`` and reseeds ``generator`` (the DataLoader's, which
    draws the workers' augmentation seeds) the same way. Lightning calls ``set_epoch`` before
    every epoch, so a run resumed from a checkpoint continues the data stream where it stopped
    instead of replaying epoch 0. (Under DDP Lightning's DistributedSampler takes over, which
    is seeded by epoch in the same way.)"""

    def __init__(self, size: int, seed: int, generator: torch.Generator) -> None:
        self.size, self.seed, self.generator = size, seed, generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self.seed + 1_000_003 * epoch)

    def __iter__(self) -> Iterator[int]:
        order = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + 1)
        return iter(torch.randperm(self.size, generator=order).tolist())

    def __len__(self) -> int:
        return self.size


class PennFudanDataModule(L.LightningDataModule):
    """Penn-Fudan train/val/test loaders from the committed split.

    val_size: 50 = the committed validation list; 0 = no validation, all 170 images train (the
    original design; `val_dataloader()` returns [] and Lightning skips validation, the test set
    is then all 170 images); other values take the first `val_size` names of the split file's
    seeded order (`order`), so a smaller set is a subset of the committed 50.
    split: the committed split file; None = every image under `root` (another dataset in the
    Penn-Fudan layout, e.g. for evaluation: `data.root=<dir> data.split=null data.verify=none`).
    verify: quick (names + sizes) | full (sha256) | none. download: fetch the official archive
    into `root` if it is missing (offline this fails within `download_timeout` seconds).
    gpu_augment: true | false | auto (= on when training on a GPU): the training loader yields
    only boxes and drawn augmentation parameters, and `on_after_batch_transfer` does the pixel
    work batched on the device (see gpu_augment.py). The CPU path is the reference.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        manifest: str | Path = DEFAULT_MANIFEST,
        split: str | Path | None = DEFAULT_SPLIT,
        val_size: int = 50,
        image_size: int = 300,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = False,
        seed: int | None = 0,
        augmentation: Mapping | None = None,
        verify: str = "quick",
        download: bool = False,
        download_url: str = URL,
        download_sha256: str | None = None,
        download_timeout: float = 5.0,
        preload: bool = True,
        drop_last: bool = False,
        gpu_augment: bool | str = "auto",
    ) -> None:
        super().__init__()
        if verify not in _VERIFY:
            raise ValueError(f"data.verify must be one of {_VERIFY}, got {verify!r}")
        self.root, self.manifest = Path(root), Path(manifest)
        self.split = None if split is None else Path(split)
        self.val_size, self.image_size = int(val_size), int(image_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        if pin_memory not in (True, False, "auto"):
            raise ValueError(f"data.pin_memory={pin_memory!r}: allowed values are true, false, auto")
        # auto: pinned batches where a GPU is present, so host-to-device copies are asynchronous
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else pin_memory
        self.persistent_workers = bool(persistent_workers)
        self.seed = None if seed is None else int(seed)
        self.augmentation: dict[str, Any] | None = (
            None if augmentation is None else to_plain(augmentation)
        )
        self.verify, self.download = verify, bool(download)
        self.download_url, self.download_sha256 = download_url, download_sha256
        self.download_timeout = float(download_timeout)
        self.preload, self.drop_last = bool(preload), bool(drop_last)
        gpu_augment_enabled(gpu_augment, False)  # a bad value fails at start-up
        self.gpu_augment = gpu_augment
        self.gpu_augmenter: GpuAugmenter | None = None
        self._verified = False
        self._names: tuple[list[str], list[str]] | None = None  # (train, val) file names
        self.train_set: PennFudanDataset | None = None
        self.val_set: PennFudanDataset | None = None
        self.test_set: PennFudanDataset | None = None

    # -- data on disk -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and not (self.root / "PNGImages").is_dir():
            download_pennfudan(
                self.root, self.download_url, self.download_sha256, self.download_timeout
            )
        self._verify()

    def _verify(self) -> None:
        if not self._verified and self.verify != "none":
            verify_dataset(self.root, self.manifest, full=self.verify == "full")
        self._verified = True

    # -- datasets -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets `stage` needs (all for None): evaluating decodes no training set."""
        self._verify()
        if self._names is None:
            if self.split is None:  # another dataset root: every image is evaluated
                names = list_image_names(self.root)
                self._names = (names, names)
            else:
                self._names = split_names(self.split, self.val_size)
        train_names, val_names = self._names
        s = self.image_size
        evaluation = build_eval_transform(
            s, antialias=(self.augmentation or {}).get("antialias", True)
        )
        if stage in (None, "fit") and self.train_set is None:
            if self.split is None:
                warnings.warn(f"data.split=null: training and validating on every image under "
                              f"{self.root}", stacklevel=2)
            self.train_set = PennFudanDataset(
                self.root,
                train_names,
                transforms=build_train_transform(self.augmentation, s),
                fallbacks=build_fallbacks(self.augmentation, s),
                skip_empty=True,
            )
            self._preload(self.train_set)
        if self.val_set is None and val_names:
            self.val_set = PennFudanDataset(self.root, val_names, transforms=evaluation)
            self._preload(self.val_set)
        if self.test_set is None:
            if self.val_set is not None:
                self.test_set = self.val_set
            else:
                warnings.warn(
                    "data.val_size=0: no held-out images; the test set is all training images",
                    stacklevel=2,
                )
                self.test_set = PennFudanDataset(self.root, train_names, transforms=evaluation)
                self._preload(self.test_set)

    def _preload(self, dataset: PennFudanDataset) -> None:
        if self.preload:  # decode once here, so forked workers inherit the cache
            dataset.preload()

    # -- loaders ------------------------------------------------------------------------------
    def _loader(self, ds: PennFudanDataset, train: bool, collate=collate_fn) -> DataLoader:
        workers = self.num_workers
        # distinct augmentation streams per DDP rank
        seed = None if self.seed is None else self.seed + (self.trainer.global_rank
                                                           if self.trainer is not None else 0)
        # seed null: torch's global generator (i.e. seed_everything) shuffles and seeds workers
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        sampler = None
        if train and generator is not None:
            sampler = EpochSeededSampler(len(ds), seed, generator)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and self.drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate,
            worker_init_fn=seed_worker,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if gpu_augment_enabled(self.gpu_augment, on_gpu):
            # the CPU train set's own transform objects draw the parameters: same semantics
            train = self.train_set
            plans = GpuPlanDataset(train.root, train.names, transforms=train.transforms,
                                   fallbacks=train.fallbacks)
            self.gpu_augmenter = GpuAugmenter(plans)
            return self._loader(plans, train=True, collate=plan_collate)
        return self._loader(self.train_set, train=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # GPU data path: the batch arrives as boxes + drawn parameters; make the pixels here
        if isinstance(batch, PlanBatch):
            return self.gpu_augmenter(batch)
        return batch

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return self._loader(self.test_set, train=False)
