"""Running the sections, and the report: the printed table and the JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torchvision

from ssd_lightning.config.atomic import atomic_write
from ssd_lightning.tools.benchmark import data_section, fit_section, sections
from ssd_lightning.tools.benchmark.options import Options, parse_options
from ssd_lightning.tools.benchmark.steps import build_net


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _meta(opts: Options, device: torch.device, num_anchors: int) -> dict:
    meta = {
        "device": device.type,
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        ),
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "num_anchors": num_anchors,
        "options": asdict(opts),
    }
    return meta


def format_table(result: dict) -> str:
    def f(x: Any, fmt: str = "9.1f") -> str:
        return format(x, fmt) if isinstance(x, int | float) else f"{'-':>9s}"

    m = result["meta"]
    o = m["options"]
    lines = [
        f"SSD benchmark on {m['device_name']} ({m['device']}), {o['precision']}, "
        f"channels_last={o['channels_last']}, S={o['image_size']}, {m['num_anchors']} "
        f"anchors, torch {m['torch']}, median of {o['repeats']} x {o['steps']} steps"
    ]
    lines.append(f"{'img/s':28s}" + "".join(f"{'bs ' + bs:>12s}" for bs in result["train"]))
    rows = [
        ("1 bare fwd+bwd+Adam", ("bare",)),
        ("2 project step", ("step",)),
        ("3 torchvision SSD train", ("torchvision",)),
        ("  ratio 2/1", ("ratios", "step/bare")),
        ("  ratio 3/1", ("ratios", "torchvision/bare")),
        ("  ratio 2/3", ("ratios", "step/torchvision")),
        ("4 bare forward", ("inference", "bare")),
        ("4 project detect", ("inference", "detect")),
        ("4 torchvision eval", ("inference", "torchvision")),
        ("  ratio detect/bare", ("inference", "ratios", "detect/bare")),
        ("  ratio tv eval/bare", ("inference", "ratios", "torchvision/bare")),
        ("  ratio detect/tv eval", ("inference", "ratios", "detect/torchvision")),
        ("4 onnxruntime detector (CPU)", ("inference", "onnxruntime")),
        ("  ratio onnxruntime/detect", ("inference", "ratios", "onnxruntime/detect")),
    ]
    for label, path in rows:
        cells = []
        for r in result["train"].values():
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, dict):
                v = v.get("img_per_s")
            cells.append(f"{f(v, '12.3f' if 'ratio' in label else '12.1f')}")
        lines.append(f"{label:28s}" + "".join(cells))
    if result.get("onnxruntime"):
        lines.append(f"  (4 onnxruntime: {result['onnxruntime']})")
    d = result.get("data")
    if d:
        bare = d.get("without_masks", {})
        for label, key in (
            ("CPU pipeline", "cpu_pipeline"),
            ("GPU path CPU side", "gpu_path_cpu_side"),
        ):
            if key not in d:  # a preset without a GPU implementation
                lines.append(f"5 data, {label:26s}{d['gpu_path']} ({d['augmentation']})")
                continue
            rate = d[key]["img_per_s_per_worker"]
            line = f"5 data, {label:26s}{f(rate)} img/s per worker ({d['augmentation']})"
            if key in bare:  # the same preset without tight boxes: what the masks cost
                line += f", {f(bare[key]['img_per_s_per_worker'], '.1f')} without masks"
            lines.append(line)
        for bs, r in d["gpu_path_pixels"].items():
            lines.append(
                f"5 data, GPU path pixels bs {bs:<6s}  {f(r['img_per_s'])} img/s on {m['device']}"
            )
    fit = result.get("fit")
    if fit:
        lines.append(
            f"6 Lightning fit (bs {fit['batch_size']})          "
            f"{f(fit['train_img_per_s'])} img/s train (steady), fit "
            f"{fit['fit_wall_s']:.1f} s, total {fit['total_wall_s']:.1f} s"
        )
        if fit.get("fit/step") is not None:
            lines.append(f"  ratio fit / project step        {f(fit['fit/step'], '9.3f')}")
    return "\n".join(lines)


def run(opts: Options, log: Callable[[str], None] = print) -> dict:
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {"train": {}}
    num_anchors = build_net(opts, torch.device("cpu")).num_anchors
    result["meta"] = _meta(opts, device, num_anchors)
    log(f"benchmark on {result['meta']['device_name']} ({device}), sections {opts.sections}")

    def save() -> None:  # after every section: a run stopped by a time limit keeps what it got
        if opts.out:
            with atomic_write(opts.out) as tmp:
                table = format_table(result)
                tmp.write_text(json.dumps({**result, "table": table}, indent=2, default=str))

    onnx = None
    if "inference" in opts.sections:
        if device.type == "cpu":  # onnxruntime runs on the CPU: compared with the CPU only
            onnx, result["onnxruntime"] = sections.onnx_detector(opts, log)
        else:
            result["onnxruntime"] = f"skipped: the benchmark runs on {device.type}"
    if any(s in opts.sections for s in ("bare", "step", "torchvision", "inference")):
        for bs in opts.batch_sizes:
            result["train"][str(bs)] = sections.bench_training(opts, device, bs, log, onnx)
            save()
    if "data" in opts.sections:
        result["data"] = data_section.bench_data(opts, device, log)
        save()
    if "fit" in opts.sections:
        result["fit"] = fit_section.bench_fit(opts, device, log)
        step = result["train"].get(str(opts.fit_batch_size), {}).get("step")
        result["fit"]["fit/step"] = (
            result["fit"]["train_img_per_s"] / step["img_per_s"]
            if step and result["fit"]["train_img_per_s"]
            else None
        )
    table = format_table(result)
    result["table"] = table
    log(table)
    save()
    if opts.out:
        log(f"wrote {opts.out}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_options(sys.argv[1:] if argv is None else argv)
    # CPU: weights trained toward tiny outputs make denormal floats, which are 10-100x slower
    torch.set_flush_denormal(True)
    run(opts)
