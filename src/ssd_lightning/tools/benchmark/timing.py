"""Timing: medians of interleaved runs, with the device synchronized around each, and the
source lines where a step function makes the host wait for the device."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fns(
    fns: dict[str, Callable[[], Any]],
    images_per_call: int,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    before_repeat: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each function over ``repeats`` runs of ``steps`` calls, after
    ``warmup`` calls. The functions' runs are interleaved (f1, f2, f3, f1, f2, f3, ...) so that
    drifting load on a shared machine hits all of them alike; the device is synchronized before
    and after each timed run, so asynchronous CUDA work is counted where it is launched."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    per_call: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_repeat is not None:
                before_repeat()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            per_call[name].append((time.perf_counter() - t0) / steps)
    out = {}
    for name, times in per_call.items():
        med = statistics.median(times)
        out[name] = {
            "img_per_s": images_per_call / med,
            "ms_per_step": 1e3 * med,
            "ms_per_step_all": [round(1e3 * t, 3) for t in times],
        }
    return out


def time_fn(
    fn: Callable[[], Any],
    images_per_call: int,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """``time_fns`` for one function."""
    return time_fns({"f": fn}, images_per_call, device, steps, warmup, repeats)["f"]


def sync_sites(fn: Callable[[], Any], device: torch.device) -> list[str] | None:
    """CUDA only: the source lines (file:line) where one call of ``fn`` synchronizes the host
    with the device, from ``torch.cuda.set_sync_debug_mode("warn")``."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted(
        {f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)}
    )


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b:
        return None
    return a["img_per_s"] / b["img_per_s"]
