"""The benchmark's data section: per-worker throughput of the augmentation pipelines on the real
images (the CPU pipeline, the GPU path's CPU side) and the GPU path's pixel work per batch."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ssd_lightning.config.paths import data_dir, load_option
from ssd_lightning.data.batch import plan_collate
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.gpu.pixels import GpuAugmenter
from ssd_lightning.data.gpu.plan import GpuPlanDataset, unplannable_steps
from ssd_lightning.data.presets import build_fallbacks, build_train_transform, needs_masks
from ssd_lightning.tools.benchmark.options import Options
from ssd_lightning.tools.benchmark.timing import time_fn


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_set(preset: dict, image_size: int) -> PennFudanDataset:
    ds = PennFudanDataset(
        data_dir() / "PennFudanPed",
        transforms=build_train_transform(preset, image_size),
        fallbacks=build_fallbacks(preset, image_size),
        skip_empty=True,
        with_masks=needs_masks(preset),
    )
    ds.preload()
    return ds


def bench_data(opts: Options, device: torch.device, log: Callable) -> dict:
    """Per-worker (one thread) throughput of the CPU pipeline and of the GPU path's CPU side - for
    a preset with ``tight_boxes`` also without them (``without_masks``: what the masks cost), the
    runs interleaved, median of ``repeats``; the GPU path's pixel work per batch on ``device``.
    A preset the GPU path cannot run (e.g. iou_crop's zoom-out) times the CPU pipeline only."""
    s, n = opts.image_size, opts.data_samples
    preset = load_option("augmentation", opts.augmentation)
    variants = {"": _train_set(preset, s)}
    if needs_masks(preset):
        variants["without_masks"] = _train_set({**preset, "tight_boxes": None}, s)
    no_gpu = unplannable_steps(variants[""].transforms)
    runs: dict[tuple[str, str], Any] = {}
    for variant, cpu in variants.items():
        runs[(variant, "cpu_pipeline")] = cpu
        if not no_gpu:
            runs[(variant, "gpu_path_cpu_side")] = GpuPlanDataset(cpu)
    seconds: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    with _threads(1):
        for ds in runs.values():
            for i in range(min(10, n)):  # warm the code paths
                ds[i % len(ds)]
        for _ in range(opts.repeats):  # interleaved, so drifting load hits every run alike
            for k, ds in runs.items():
                torch.manual_seed(opts.seed)
                t0 = time.perf_counter()
                for i in range(n):
                    ds[i % len(ds)]
                seconds[k].append(time.perf_counter() - t0)
    res: dict[str, Any] = {"augmentation": opts.augmentation, "images": len(variants[""])}
    for (variant, key), times in seconds.items():
        rate = n / statistics.median(times)
        (res.setdefault(variant, {}) if variant else res)[key] = {
            "img_per_s_per_worker": rate,
            "samples": n,
        }
        log(f"  data {key:20s} {variant:14s}{rate:9.1f} img/s per worker")
    res["gpu_path_pixels"] = {}
    if no_gpu:
        res["gpu_path"] = f"not timed: no GPU implementation of {', '.join(no_gpu)}"
        log(f"  data gpu path: {res['gpu_path']}")
        return res
    plan = runs[("", "gpu_path_cpu_side")]  # the one the timing above used
    aug = GpuAugmenter(variants[""])
    for bs in opts.batch_sizes:
        torch.manual_seed(opts.seed)
        pb = plan_collate([plan[i % len(plan)] for i in range(bs)])
        pb = pb.to(device)
        aug(pb)  # builds the device store once
        r = time_fn(lambda pb=pb: aug(pb), bs, device, opts.steps, opts.warmup, opts.repeats)
        res["gpu_path_pixels"][str(bs)] = r
        log(f"  data gpu path pixels bs {bs:<4d} {r['img_per_s']:9.1f} img/s on {device.type}")
    return res
