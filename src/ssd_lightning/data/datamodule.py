"""`DetectionDataModule`, the base of the DataModules: v2 pipelines, the seeded training stream,
loaders, the GPU data path. The datasets' own: `data.pennfudan_datamodule.PennFudanDataModule`
(verified vendored data, committed split) and `data.coco_datamodule.CocoDataModule`.

Batches are `batch.Batch`: images (B,3,S,S) float [0,1], boxes (B,G,4) xyxy in network-input
pixels [0,S] (train: after augmentation; val/test: resized ground truth), orig_sizes (H,W).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssd_lightning.core.plain import is_int, to_plain
from ssd_lightning.data.batch import PlanBatch, TargetBatch, collate_fn, plan_collate
from ssd_lightning.data.dataset import CLASS_NAMES, DetectionDataset
from ssd_lightning.data.gpu.pixels import GpuAugmenter
from ssd_lightning.data.gpu.plan import GpuPlanDataset, unplannable_steps
from ssd_lightning.data.presets import (
    build_eval_transform,
    build_fallbacks,
    build_train_transform,
)
from ssd_lightning.data.sampling import (
    EpochSeededSampler,
    SeededSamples,
    ShardSampler,
    seed_worker,
)
from ssd_lightning.data.workers import worker_context

log = logging.getLogger(__name__)


def check_choice(key: str, value: Any, allowed: tuple) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming the config key."""
    if value not in allowed:
        shown = ", ".join("auto" if a is None else str(a).lower() for a in allowed)
        raise ValueError(f"{key}={value!r}: allowed values are {shown}")
    return value


def check_int(key: str, value: Any, low: int) -> None:
    """A ValueError naming ``data.<key>`` unless ``value`` is an integer >= ``low``."""
    if not is_int(value, low):
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
        self.pin_memory_option = check_choice("data.pin_memory", pin_memory, (True, False, "auto"))
        self.gpu_augment = check_choice("data.gpu_augment", gpu_augment, (True, False, "auto"))
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("image_size", image_size, 16),
        ):
            check_int(key, value, low)
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

    def relabel(self, labels: Sequence[int], class_names: Sequence[str]) -> None:
        """Renumber the classes as a trained model's (before ``setup``): the data's label k
        becomes ``labels[k]``, ``class_names`` (the model's) say what they mean. A ValueError
        where the dataset cannot."""
        raise ValueError(f"{type(self).__name__} cannot renumber its classes")

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

    def _set_test_set(self, all_training_images: Callable[[], DetectionDataset]) -> None:
        """The test set is the validation set; without one, every training image (warned)."""
        if self.test_set is not None:
            return
        if self.val_set is not None:
            self.test_set = self.val_set
            return
        warnings.warn(
            "data.val_size=0: no held-out images; the test set is all training images",
            stacklevel=3,
        )
        self.test_set = all_training_images()

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
        world = trainer.world_size if trainer is not None else 1
        if not train and world > 1:
            sampler = ShardSampler(len(ds), num_replicas=world, rank=rank)  # no image twice
        if train and self.seed is not None:
            sampler = EpochSeededSampler(len(ds), self.seed, num_replicas=world, rank=rank)
            if trainer is not None:
                # Lightning makes the fit's first iterator before its first set_epoch, and with
                # workers the indices are drawn right then: start at the epoch it will train
                # (a resumed run's, not 0; after an epoch-end checkpoint, the next one)
                epoch = trainer.fit_loop.epoch_progress.current.processed
                if self._resume_position is not None:
                    epoch = self._resume_position[0]
                sampler.set_epoch(epoch)
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
        if batches >= trainer.num_training_batches:  # saved at the epoch's end: the next is due
            return {"epoch": sampler.epoch + 1, "samples_done": 0}
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
        if self.gpu_augment == "auto" and on_gpu:
            # every training image stays on the device: fine for Penn-Fudan (~1.2 GB), not for
            # a large dataset, which auto leaves to the CPU workers
            need = GpuAugmenter(self.train_set).store_bytes()
            free, _ = torch.cuda.mem_get_info(self.trainer.strategy.root_device)
            if need > free // 4:
                log.info(
                    "data.gpu_augment=auto: the training images would take %.1f GB of the GPU's "
                    "%.1f GB free; the CPU data path is used (data.gpu_augment=true forces it)",
                    need / 1e9,
                    free / 1e9,
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

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Lightning copies bare tensors with non_blocking=True, but not the fields of the batch
        # dataclasses: each pinned field would be a host sync per step
        if isinstance(batch, TargetBatch) and device.type == "cuda":
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

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
