"""The benchmark's ``key=value`` options, with device-dependent defaults."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ssd_lightning.config.errors import ConfigError, ToolParser
from ssd_lightning.core.plain import is_int

SECTIONS = ("bare", "step", "torchvision", "inference", "data", "fit")


@dataclass
class Options:
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [2])
    precision: str = "fp32"
    channels_last: bool | str = "auto"
    image_size: int = 300
    steps: int = 2
    warmup: int = 1
    repeats: int = 3
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    compile: bool = False
    data_samples: int = 60
    fit_epochs: int = 2
    fit_batches: int | None = 3
    fit_batch_size: int | None = None
    fit_overrides: list[str] = field(default_factory=list)
    out: str | None = None
    seed: int = 0
    anchors: str = "tall_skinny"
    augmentation: str = "safe_crop"


CUDA_DEFAULTS = {
    "batch_sizes": [32, 128],
    "precision": "bf16",
    "steps": 20,
    "warmup": 10,
    "repeats": 5,
    "data_samples": 400,
    "fit_epochs": 10,
    "fit_batches": None,
}


class OptionError(ConfigError):
    """A benchmark option that cannot work; the message names it and the allowed values."""


def parse_options(argv: Sequence[str]) -> Options:
    """``key=value`` pairs (YAML values) -> Options, with device-dependent defaults."""
    parser = ToolParser(
        prog="python -m ssd_lightning.benchmark",
        description=sys.modules["ssd_lightning.tools.benchmark"].__doc__,  # the package's
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="key=value, see the module docstring")
    args = parser.parse_args(list(argv))
    given: dict[str, Any] = {}
    known = {f for f in Options.__dataclass_fields__}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"benchmark argument {item!r}: expected key=value")
        if key not in known:
            raise OptionError(f"benchmark option {key!r} is unknown; allowed: {sorted(known)}")
        given[key] = yaml.safe_load(value) if value != "" else None
    device = str(given.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if device not in ("cpu", "cuda"):
        raise OptionError(f"benchmark option device={device!r}: allowed values are cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("benchmark option device=cuda, but torch.cuda.is_available() is False")
    values = {**(CUDA_DEFAULTS if device == "cuda" else {}), **given, "device": device}
    opts = Options(**values)
    if isinstance(opts.batch_sizes, int):
        opts.batch_sizes = [opts.batch_sizes]
    if isinstance(opts.sections, str):
        opts.sections = [s.strip() for s in opts.sections.split(",")]
    if opts.sections == ["all"]:
        opts.sections = list(SECTIONS)
    bad = [s for s in opts.sections if s not in SECTIONS]
    if bad:
        raise OptionError(f"benchmark option sections: {bad} unknown; allowed: {SECTIONS} or all")
    if opts.precision not in ("fp32", "bf16"):
        raise OptionError(f"benchmark option precision={opts.precision!r}: allowed fp32, bf16")
    if opts.channels_last not in (True, False, "auto"):
        raise OptionError(
            f"benchmark option channels_last={opts.channels_last!r}: allowed true, false, auto"
        )
    if opts.channels_last == "auto":
        opts.channels_last = device == "cuda"
    # YAML values: batch_sizes=abc is a string, steps=1.5 a float; each one message, not a
    # TypeError (or a silently truthy compile=maybe) once the timing has started
    ints = {"steps": 1, "repeats": 1, "warmup": 0, "data_samples": 1, "fit_epochs": 1, "seed": 0}
    for key, low in {**ints, "image_size": 64}.items():  # 64: the network's smallest input
        if not is_int(getattr(opts, key), low):
            raise OptionError(
                f"benchmark option {key}={getattr(opts, key)!r}: must be an integer >= {low}"
            )
    for key in ("fit_batches", "fit_batch_size"):
        if getattr(opts, key) is not None and not is_int(getattr(opts, key), 1):
            raise OptionError(
                f"benchmark option {key}={getattr(opts, key)!r}: must be null or an integer >= 1"
            )
    if not (
        isinstance(opts.batch_sizes, list)
        and opts.batch_sizes
        and all(is_int(b, 1) for b in opts.batch_sizes)
    ):
        raise OptionError(
            f"benchmark option batch_sizes={opts.batch_sizes!r}: must be a list of integers >= 1 "
            "(e.g. 'batch_sizes=[32,128]')"
        )
    if not isinstance(opts.compile, bool):
        raise OptionError(f"benchmark option compile={opts.compile!r}: allowed true, false")
    if opts.fit_batch_size is None:
        opts.fit_batch_size = opts.batch_sizes[0]
    if opts.out is None:
        opts.out = f"outputs/benchmark/benchmark_{device}.json"
    out_dir = Path(str(opts.out)).expanduser().parent
    try:  # before any timing: the results must have somewhere to go
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(
            f"benchmark option out={opts.out}: cannot create {out_dir} ({e.strerror})"
        ) from None
    return opts
