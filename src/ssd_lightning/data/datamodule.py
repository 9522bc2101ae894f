"""DataModules: `DetectionDataModule` (v2 pipelines, the seeded training stream, loaders, the GPU
data path) and `PennFudanDataModule` (verified vendored data, committed split); the COCO one is
`data.coco_datamodule.CocoDataModule`.

Batches are `batch.Batch`: images (B,3,S,S) float [0,1], boxes (B,G,4) xyxy in network-input
pixels [0,S] (train: after augmentation; val/test: resized ground truth), orig_sizes (H,W).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssd_lightning.config.paths import data_dir
from ssd_lightning.core.plain import to_plain
from ssd_lightning.data.batch import PlanBatch, collate_fn, plan_collate
from ssd_lightning.data.dataset import (
    CLASS_NAMES,
    DetectionDataset,
    PennFudanDataset,
    load_instances,
)
from ssd_lightning.data.download import URL, download_pennfudan
from ssd_lightning.data.gpu.pixels import GpuAugmenter
from ssd_lightning.data.gpu.plan import GpuPlanDataset, unplannable_steps
from ssd_lightning.data.manifest import (
    IMAGE_DIR,
    MASK_DIR,
    list_image_names,
    load_json,
    mask_name,
    split_names,
    verify_dataset,
)
from ssd_lightning.data.presets import (
    build_eval_transform,
    build_fallbacks,
    build_train_transform,
    needs_masks,
)
from ssd_lightning.data.workers import ignore_stop_signals, worker_context

log = logging.getLogger(__name__)

_VERIFY = ("quick", "full", "none")
_AUTO = ("auto", None)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn. torch already gives each worker base_seed + worker_id (and the
    base seed changes every epoch); seed `random`/numpy from it too so nothing repeats.

    Workers ignore SIGINT / SIGTERM: a cluster's time limit or Ctrl-C signals the whole process
    group, and a worker dying of it would crash the main process, which instead finishes its
    batch, saves and shuts the workers down (they also exit when it dies)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global RNG is what third-party code uses
    ignore_stop_signals()  # see data/workers.py


class EpochSeededSampler(DistributedSampler):
    """The training order and every sample's augmentation seed, from (seed, epoch) alone.

    Yields ``(index, sample_seed)`` pairs that ``SeededSamples`` turns into seeded draws: a
    sample's augmentation then depends neither on the DataLoader worker that makes it nor on how
    many workers there are or what they did before. So the batches of an epoch are the same for
    any ``num_workers``, and a resumed run continues the stream exactly: Lightning calls
    ``set_epoch`` before every epoch, and ``resume_at`` skips the samples of the resumed epoch
    that were trained before the interruption. Under DDP every rank takes its share
    (``rank::num_replicas``) of the same epoch order; being a ``DistributedSampler`` it is kept
    by Lightning as it is.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of it to skip)

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Skip the first ``samples_done`` samples of this rank's share when ``epoch`` comes."""
        self._resume = (epoch, samples_done)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        size = len(self.dataset)
        # one well-mixed stream per (seed, epoch): a seed per image, then the order's seed
        words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(size + 1, np.uint64)
        seeds = [int(w) >> 1 for w in words]  # 63 bits: any torch / Python seed
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seeds[size]))
        order = order.tolist()
        order += order[: self.total_size - size]  # every rank gets as many (as DistributedSampler)
        mine = order[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        return iter([(i, seeds[i]) for i in mine[start:]])


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's (CPU), Python's and numpy's global RNGs seeded from the
    ``(index, seed)`` an ``EpochSeededSampler`` yields, in whichever process makes the sample (a
    worker, or the main process when ``num_workers=0``). Plain indices (a sampler Lightning put
    in place, e.g. for ``overfit_batches``) are passed through unseeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            item, seed = item
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global RNG third-party code uses
        return self.dataset[item]


def _choice(key: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        shown = ", ".join("auto" if a is None else str(a).lower() for a in allowed)
        raise ValueError(f"{key}={value!r}: allowed values are {shown}")
    return value


def _check_int(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"data.{key}={value!r}: allowed values are integers >= {low}")


class DetectionDataModule(L.LightningDataModule):
    """What the DataModules of every dataset share: the v2 pipelines, the seeded and resumable
    training stream, the loaders and the GPU data path. A subclass reads its dataset: it builds
    ``train_set`` / ``val_set`` / ``test_set`` (``DetectionDataset``) in ``setup``, names its
    classes (``class_names``, index = label, 0 = background) and gives ``training_boxes``.

    augmentation: an augmentation preset (conf/augmentation/<name>.yaml); None = resize only.
    gpu_augment: true | false | auto (= on when training on a GPU): the training loader yields
    only boxes and drawn augmentation parameters, and `on_after_batch_transfer` does the pixel
    work batched on the device (see data/gpu/). The CPU path is the reference.
    num_classes: the model's (``model.net.num_classes`` follows it): checked against the
    dataset's classes + background when given.
    """

    def __init__(
        self,
        image_size: int = 300,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = False,
        seed: int | None = 0,
        augmentation: Mapping | None = None,
        preload: bool = True,
        drop_last: bool = False,
        gpu_augment: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.pin_memory_option = _choice("data.pin_memory", pin_memory, (True, False, "auto"))
        self.gpu_augment = _choice("data.gpu_augment", gpu_augment, (True, False, "auto"))
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("image_size", image_size, 16),
        ):
            _check_int(key, value, low)
        self.image_size = image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.persistent_workers = bool(persistent_workers)
        self.seed = None if seed is None else int(seed)
        self.augmentation = None if augmentation is None else to_plain(augmentation)
        self.preload, self.drop_last = bool(preload), bool(drop_last)
        # the pipelines are built now: a bad augmentation value fails at start-up, not in a worker
        antialias = (self.augmentation or {}).get("antialias", True)
        self.train_transform = build_train_transform(self.augmentation, image_size)
        self.fallbacks = build_fallbacks(self.augmentation, image_size)
        self.eval_transform = build_eval_transform(image_size, antialias=antialias)
        self.gpu_augmenter: GpuAugmenter | None = None
        self._train_sampler: EpochSeededSampler | None = None
        self._resume_position: tuple[int, int] | None = (
            None  # (epoch, samples done), see load_state_dict
        )
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None
        self.test_set: DetectionDataset | None = None

    @property
    def class_names(self) -> list[str]:
        """Index = label; 0 = background."""
        return list(CLASS_NAMES)

    @staticmethod
    def _check_num_classes(num_classes: int | None, class_names: list[str], source: str) -> None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(
                f"data.num_classes={num_classes!r}: {source} has {len(class_names) - 1} "
                f"class(es) ({', '.join(class_names[1:])}), so the model needs "
                f"{len(class_names)} (with the background); leave model.net.num_classes and "
                "data.num_classes to follow the dataset"
            )

    def training_boxes(self) -> Tensor:
        """GT boxes of the training split, (G, 4) xyxy normalized to their image."""
        raise NotImplementedError

    def split_description(self, use_val: bool) -> str:
        """What ``evaluate`` ran on, for its table's title."""
        return "val" if use_val else "all"

    def _preloaded(self, ds: DetectionDataset) -> DetectionDataset:
        if self.preload:  # decode images and masks once here, so forked workers inherit them
            ds.preload()
        return ds

    @property
    def pin_memory(self) -> bool:
        # auto: pinned batches where a GPU is present, so host-to-device copies are asynchronous
        if self.pin_memory_option == "auto":
            return torch.cuda.is_available()
        return bool(self.pin_memory_option)

    # -- loaders ------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, train: bool, collate: Callable = collate_fn) -> DataLoader:
        workers = self.num_workers
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        seed = None if self.seed is None else self.seed + rank
        # seed null: torch's global generator (i.e. seed_everything) shuffles and seeds workers
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        sampler = None
        if train and self.seed is not None:
            world = trainer.world_size if trainer is not None else 1
            sampler = EpochSeededSampler(len(ds), self.seed, num_replicas=world, rank=rank)
            if trainer is not None:
                # Lightning makes the fit's first iterator before its first set_epoch, and with
                # workers the indices are drawn right then: start at the epoch it will train
                # (a resumed run's, not 0)
                sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
            if self._resume_position is not None:
                sampler.resume_at(*self._resume_position)
                self._resume_position = None
            ds = SeededSamples(ds)
            self._train_sampler = sampler
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
            multiprocessing_context=worker_context(workers),
            generator=generator,
        )

    # -- resuming -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the training data stream stands, saved in checkpoints: the epoch and how many of
        its samples this rank has trained on (Lightning's count of finished batches)."""
        sampler, trainer = self._train_sampler, self.trainer
        if sampler is None or trainer is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return {"epoch": sampler.epoch, "samples_done": batches * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved data stream: a run resumed mid-epoch (e.g. after SIGTERM) skips the
        samples it already trained on instead of replaying the epoch's first batches."""
        if state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["samples_done"]))

    def _use_gpu_path(self) -> bool:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        wanted = on_gpu if self.gpu_augment == "auto" else bool(self.gpu_augment)
        if not wanted:
            return False
        missing = unplannable_steps(self.train_transform)
        if missing:
            (log.info if self.gpu_augment == "auto" else log.warning)(
                "data.gpu_augment: the augmentation pipeline has steps without a GPU "
                "implementation (%s); the CPU data path is used",
                ", ".join(missing),
            )
            return False
        return True

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self._use_gpu_path():
            # the CPU train set's own transform objects draw the parameters: same semantics
            self.gpu_augmenter = GpuAugmenter(self.train_set)
            return self._loader(GpuPlanDataset(self.train_set), train=True, collate=plan_collate)
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


class PennFudanDataModule(DetectionDataModule):
    """Penn-Fudan train/val/test loaders from the committed split.

    val_size: 50 = the committed validation list; 0 = no validation, all 170 images train (the
    original design; `val_dataloader()` returns [] and Lightning skips validation, the test set
    is then all 170 images); other values take the first `val_size` names of the split file's
    seeded order, so a smaller set is a subset of the committed 50.
    root, manifest, split: the dataset folder, its manifest and split file. With ``root`` None
    all three default to the vendored dataset (data/); otherwise a ``split`` of None means every
    image under `root` (another dataset in the Penn-Fudan layout, e.g. for evaluation:
    `data.root=<dir> data.split=null data.verify=none`).
    verify: quick (names + sizes) | full (sha256) | none. download: fetch the official archive
    into `root` if it is missing (offline this fails within `download_timeout` seconds).
    The other arguments: see ``DetectionDataModule``.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        manifest: str | Path | None = None,
        split: str | Path | None = None,
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
        num_classes: int | None = None,
    ) -> None:
        self.verify = _choice("data.verify", verify, _VERIFY)
        _check_int("val_size", val_size, 0)
        super().__init__(
            image_size,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            seed,
            augmentation,
            preload,
            drop_last,
            gpu_augment,
        )
        self._check_num_classes(num_classes, self.class_names, "Penn-Fudan")
        if root is None:  # the vendored dataset
            root = data_dir() / "PennFudanPed"
            manifest = manifest or data_dir() / "pennfudan_manifest.json"
            split = split or data_dir() / "pennfudan_split.json"
        self.root = Path(root)
        self.manifest = None if manifest is None else Path(manifest)
        self.split = None if split is None else Path(split)
        self.val_size = val_size
        self.download = bool(download)
        self.download_url, self.download_sha256 = download_url, download_sha256
        self.download_timeout = float(download_timeout)
        # a split file that cannot give val_size images fails here, before the model is built
        self._split = None if self.split is None else load_json(self.split)
        if self._split is not None:
            split_names(self._split, self.val_size)
        self._verified = False

    # -- data on disk -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and not (self.root / "PNGImages").is_dir():
            download_pennfudan(
                self.root, self.download_url, self.download_sha256, self.download_timeout
            )
        self._verify()

    def _verify(self) -> None:
        if not self._verified and self.verify != "none":
            if self.manifest is None:
                raise ValueError("data.verify: needs data.manifest (or data.verify=none)")
            verify_dataset(self.root, self.manifest, full=self.verify == "full")
        self._verified = True

    def _names(self) -> tuple[list[str], list[str]]:
        """(train, val) file names."""
        if self._split is None:  # another dataset root: every image is evaluated
            names = list_image_names(self.root)
            return names, names
        return split_names(self._split, self.val_size)

    # -- datasets -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets `stage` needs (all for None): evaluating decodes no training set."""
        self._verify()
        train_names, val_names = self._names()
        if stage in (None, "fit") and self.train_set is None:
            if self._split is None:
                warnings.warn(
                    f"data.split=null: training and validating on every image under {self.root}",
                    stacklevel=2,
                )
            self.train_set = self._dataset(train_names, self.train_transform, self.fallbacks, True)
        if self.val_set is None and val_names:
            self.val_set = self._dataset(val_names, self.eval_transform)
        if self.test_set is None:
            if self.val_set is not None:
                self.test_set = self.val_set
            else:
                warnings.warn(
                    "data.val_size=0: no held-out images; the test set is all training images",
                    stacklevel=2,
                )
                self.test_set = self._dataset(train_names, self.eval_transform)

    def _dataset(
        self,
        names: list[str],
        transform: Callable,
        fallbacks: list | None = None,
        train: bool = False,
    ) -> PennFudanDataset:
        # only the augmented training boxes are recomputed from the masks
        masks = train and needs_masks(self.augmentation)
        ds = PennFudanDataset(
            self.root, names, transform, fallbacks or [], skip_empty=train, with_masks=masks
        )
        return self._preloaded(ds)

    def training_boxes(self) -> Tensor:
        """GT boxes of the training split, (G, 4) xyxy normalized to their image (read from the
        mask files and the image headers: no pixel decode)."""
        train = self._names()[0]
        out = []
        for name in train:
            with Image.open(self.root / IMAGE_DIR / name) as im:  # header only
                w, h = im.size
            boxes, _, _ = load_instances(str(self.root / MASK_DIR / mask_name(name)))
            out.append(boxes / torch.tensor([w, h, w, h], dtype=torch.float32))
        return torch.cat(out)

    def split_description(self, use_val: bool) -> str:
        if self._split is None:
            return f"all images of {self.root}"
        return super().split_description(use_val)
