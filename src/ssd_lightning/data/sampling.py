"""The seeded training stream: which images an epoch trains on, in which order, and with which
augmentation draws - a function of (seed, epoch, image) alone, whatever the number of DataLoader
workers, and resumable in the middle of an epoch.

``EpochSeededSampler`` yields ``(index, sample_seed)``; ``SeededSamples`` seeds the RNGs from it
before making the sample; ``seed_worker`` is the DataLoader's ``worker_init_fn``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ssd_lightning.data.workers import ignore_stop_signals


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


class ShardSampler(DistributedSampler):
    """Evaluation under DDP: rank ``r`` of ``n`` takes images ``r, r + n, ...``, each image once.
    Lightning's own DistributedSampler pads the ranks to equal length with repeated images, which
    the mAP would count twice (50 images on 4 GPUs: 52); being a ``DistributedSampler`` this one
    is kept as it is. Ranks may get one image more than others: evaluation has no per-step
    collective (the metrics gather their states once, at the end)."""

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, size, num_replicas))
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
