"""`PennFudanDataModule`: verified vendored data, committed split, v2 pipelines, padded batches.

Batches are `collate.Batch`: images (B,3,S,S) float [0,1], boxes (B,G,4) xyxy in network-input
pixels [0,S] (train: after augmentation; val/test: resized ground truth), orig_sizes (H,W).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ssd_lightning.data.collate import collate_fn
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.download import URL, download_pennfudan
from ssd_lightning.data.gpu_augment import (
    GpuAugmenter,
    PlanBatch,
    build_plan_dataset,
    gpu_augment_enabled,
    plan_collate,
)
from ssd_lightning.data.manifest import (
    DEFAULT_MANIFEST,
    DEFAULT_ROOT,
    DEFAULT_SPLIT,
    split_names,
    verify_dataset,
)
from ssd_lightning.data.transforms import (
    _to_plain,
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


class PennFudanDataModule(L.LightningDataModule):
    """Penn-Fudan train/val/test loaders from the committed split.

    val_size: 50 = the committed validation list; 0 = no validation, all 170 images train (the
    original design; `val_dataloader()` returns [] and Lightning skips validation, the test set
    is then all 170 images); other values take the first `val_size` names of the split file's
    seeded order (`order`), so a smaller set is a subset of the committed 50.
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
        split: str | Path = DEFAULT_SPLIT,
        val_size: int = 50,
        image_size: int = 300,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
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
        self.root, self.manifest, self.split = Path(root), Path(manifest), Path(split)
        self.val_size, self.image_size = int(val_size), int(image_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.seed = None if seed is None else int(seed)
        self.augmentation: dict[str, Any] | None = (
            None if augmentation is None else _to_plain(augmentation)
        )
        self.verify, self.download = verify, bool(download)
        self.download_url, self.download_sha256 = download_url, download_sha256
        self.download_timeout = float(download_timeout)
        self.preload, self.drop_last = bool(preload), bool(drop_last)
        gpu_augment_enabled(gpu_augment, False)  # a bad value fails at start-up
        self.gpu_augment = gpu_augment
        self.gpu_augmenter: GpuAugmenter | None = None
        self._verified = False
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
        if self.train_set is not None:
            return
        self._verify()
        train_names, val_names = split_names(self.split, self.val_size)
        s = self.image_size
        self.train_set = PennFudanDataset(
            self.root,
            train_names,
            transforms=build_train_transform(self.augmentation, s),
            fallbacks=build_fallbacks(self.augmentation, s),
            skip_empty=True,
        )
        evaluation = build_eval_transform(
            s, antialias=(self.augmentation or {}).get("antialias", True)
        )
        self.val_set = (
            PennFudanDataset(self.root, val_names, transforms=evaluation) if val_names else None
        )
        if val_names:
            self.test_set = self.val_set
        else:
            warnings.warn(
                "data.val_size=0: no held-out images; the test set is all 170 training images",
                stacklevel=2,
            )
            self.test_set = PennFudanDataset(self.root, train_names, transforms=evaluation)
        if self.preload:  # decode once here, so forked workers inherit the cache
            self.train_set.preload()
            self.test_set.preload()
            if self.val_set is not None:
                self.val_set.preload()

    # -- loaders ------------------------------------------------------------------------------
    def _loader(self, ds: PennFudanDataset, train: bool, collate=collate_fn) -> DataLoader:
        workers = self.num_workers
        # distinct augmentation streams per DDP rank
        seed = None if self.seed is None else self.seed + (self.trainer.global_rank
                                                           if self.trainer is not None else 0)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate,
            worker_init_fn=seed_worker,
            # seeds the shuffle order and each epoch's worker base seed, so runs reproduce
            # (seed null: torch's global generator, i.e. seed_everything)
            generator=None if seed is None else torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if gpu_augment_enabled(self.gpu_augment, on_gpu):
            plans = build_plan_dataset(self.root, self.train_set.names, self.augmentation,
                                       self.image_size)
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
