"""The benchmark's fit section: a short Lightning fit of the default recipe, built as
``ssd_lightning.train`` builds it, timed per epoch."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ssd_lightning.config.compose import compose
from ssd_lightning.tools.benchmark.options import Options
from ssd_lightning.tools.benchmark.timing import sync
from ssd_lightning.training.builders import build


def _compose_fit_cfg(opts: Options, out_dir: Path) -> tuple[DictConfig, list[str]]:
    cuda = opts.device == "cuda"
    overrides = [
        f"trainer={'gpu' if cuda else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if opts.precision == 'bf16' else '32-true'}",
        "logger=none",
        "model.net.weights=none",
        f"model.net.image_size={opts.image_size}",
        f"data.batch_size={opts.fit_batch_size}",
        f"trainer.max_epochs={opts.fit_epochs}",
        f"trainer.limit_train_batches={'null' if opts.fit_batches is None else opts.fit_batches}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"seed={opts.seed}",
    ]
    if not cuda:
        overrides += [
            "data.num_workers=0",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
        ]
    overrides += list(opts.fit_overrides)
    return compose("train", overrides, output_dir=str(out_dir), job_name="benchmark"), overrides


def bench_fit(opts: Options, device: torch.device, log: Callable) -> dict:
    """A short Lightning fit of the default recipe, built as ``ssd_lightning.train`` builds it
    (plus a timing callback, without a logger)."""

    class FitTimer(Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[float, int]] = []  # (train seconds, images) per epoch
            self.val_s: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += len(batch)
            if batch_idx + 1 == trainer.num_training_batches:  # sync once per epoch only
                sync(device)
                self.epochs.append((time.perf_counter() - self.t0, self.n))

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            self.v0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            sync(device)
            self.val_s.append(time.perf_counter() - self.v0)

    out_dir = Path(tempfile.mkdtemp(prefix="ssd_bench_fit_"))
    try:
        t_start = time.perf_counter()
        cfg, overrides = _compose_fit_cfg(opts, out_dir)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        timer = FitTimer()
        module, datamodule, trainer = build(cfg, extra_callbacks=[timer])
        t_fit = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        sync(device)
        t_end = time.perf_counter()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    steady = timer.epochs[1:] or timer.epochs
    secs = sum(t for t, _ in steady)
    imgs = sum(n for _, n in steady)
    res = {
        "overrides": overrides,
        "batch_size": opts.fit_batch_size,
        "epochs": len(timer.epochs),
        "train_img_per_s": imgs / secs if secs > 0 else None,
        "first_epoch_s": timer.epochs[0][0] if timer.epochs else None,
        "train_s_per_epoch": [round(t, 3) for t, _ in timer.epochs],
        "val_s_per_epoch": [round(t, 3) for t in timer.val_s],
        "fit_wall_s": t_end - t_fit,
        "total_wall_s": t_end - t_start,
    }
    log(
        f"  fit: {res['train_img_per_s'] or 0:9.1f} train img/s (steady), "
        f"fit {res['fit_wall_s']:.1f} s, total {res['total_wall_s']:.1f} s"
    )
    return res
