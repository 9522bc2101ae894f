"""Run an exported detector (``python -m ssd_lightning.export``) in onnxruntime: the
``SSD.detect`` of a shipped model, without the PyTorch model code (predict's ``.onnx`` path).

The ``.onnx`` file describes itself (input size, thresholds, class names, anchors, ...) in its
metadata under ``ssd_lightning``; the JSON sidecar beside it holds the same, for people and for
other tools. The detector graph's thresholds are fixed at export: a stricter score threshold or a
smaller top-k is applied exactly here (NMS keeps the same boxes above any higher threshold), a
looser one needs a new export.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssd_lightning.config.extras import require
from ssd_lightning.data.images import InputError

METADATA_KEY = "ssd_lightning"  # the JSON description in the ONNX model's metadata_props
# the graphs an export writes: network + postprocess = detector
DETECTOR, NETWORK, POSTPROCESS = "detector", "network", "postprocess"


def _providers(ort: Any, device: str) -> list[Any]:
    """onnxruntime execution providers for predict's ``device`` (auto | cpu | cuda | cuda:<n>)."""
    available = ort.get_available_providers()
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise InputError(f"device={device!r}: allowed values are auto, cpu, cuda, cuda:<n>")
    if "CUDAExecutionProvider" not in available:
        raise InputError(
            f"device={device}: this onnxruntime has no CUDA provider (pip install "
            "onnxruntime-gpu), or use device=cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def open_session(path: str | Path, device: str = "cpu", key: str = "ckpt_path") -> tuple[Any, dict]:
    """An onnxruntime session of an exported graph, and the description stored in it."""
    ort = require("onnxruntime", "onnxruntime", "onnx", f"{key}={path} (an ONNX model)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{key}={path}: no such file")
    try:
        session = ort.InferenceSession(str(path), providers=_providers(ort, device))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not ONNX: one clear message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{key}={path}: onnxruntime cannot load it ({first})") from None
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if meta is None:
        raise InputError(
            f"{key}={path}: not a model written by `python -m ssd_lightning.export` (its metadata "
            f"has no '{METADATA_KEY}' entry)"
        )
    return session, json.loads(meta)


class OnnxDetector:
    """An exported detector graph in onnxruntime, with ``SSD.detect``'s interface."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path).expanduser()
        self.session, self.info = open_session(self.path, device)
        if self.info.get("graph") != DETECTOR:
            raise InputError(
                f"ckpt_path={self.path}: this is the {self.info.get('graph')} graph alone; predict "
                f"runs the detector written beside it ({self.info.get(DETECTOR, '<stem>.onnx')})"
            )
        self.image_size = int(self.info["image_size"])
        self.thresholds: dict[str, Any] = dict(self.info["thresholds"])
        self.class_names: list[str] = list(self.info["class_names"])

    def run(self, images: np.ndarray, orig_sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        """images (B,3,S,S) float32 in [0,1], orig_sizes (B,2) int64 (h, w) -> boxes (D,4) xyxy
        in original pixels, scores (D,), labels (D,), image_index (D,), sorted by image, score."""
        feeds = {
            "images": np.ascontiguousarray(images, dtype=np.float32),
            "orig_sizes": np.ascontiguousarray(orig_sizes, dtype=np.int64),
        }
        return tuple(self.session.run(None, feeds))

    def check_thresholds(
        self,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        top_k: int | None = None,
        pre_nms_top_k: int | None = None,
    ) -> dict[str, Any]:
        """The thresholds to apply: the exported ones, made stricter where asked. Looser ones
        cannot be had from this graph: the message says how to export again."""
        asked = {
            "score_threshold": score_threshold,
            "nms_threshold": nms_threshold,
            "top_k": top_k,
            "pre_nms_top_k": pre_nms_top_k,
        }
        out = dict(self.thresholds)
        for name, value in asked.items():
            if value is None:
                continue
            fixed = self.thresholds.get(name)
            ok = {
                "score_threshold": value >= fixed,
                "nms_threshold": value == fixed,
                "top_k": value <= fixed,
                "pre_nms_top_k": value == fixed,
            }[name]
            if not ok:
                need = {"top_k": "<=", "score_threshold": ">="}.get(name, "=")
                source = self.info.get("source") or "<the .ckpt or .pt>"
                raise InputError(
                    f"{name}={value}: {self.path.name} was exported with {name}={fixed}, so it "
                    f"allows {name} {need} {fixed}; for {value}, export again: python -m "
                    f"ssd_lightning.export ckpt_path={source} {name}={value}"
                )
            out[name] = value
        return out

    def detect(
        self,
        images: Tensor,
        orig_sizes: Tensor | None = None,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        top_k: int | None = None,
        pre_nms_top_k: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """Like ``SSD.detect``: images (B,3,S,S) in [0,1] -> per-image dicts of ``boxes`` (K,4)
        xyxy in the pixels of ``orig_sizes`` (B,2) (h, w) (None: of the images), ``scores``,
        ``labels``; on the CPU. ``pre_nms_top_k`` is fixed in the graph (the exported value, or
        None)."""
        thr = self.check_thresholds(score_threshold, nms_threshold, top_k, pre_nms_top_k)
        if orig_sizes is None:
            orig_sizes = torch.tensor([images.shape[-2:]]).expand(len(images), 2)
        out = self.run(images.detach().cpu().numpy(), orig_sizes.cpu().numpy())
        return per_image(out, len(images), thr["score_threshold"], thr["top_k"])


def per_image(
    outputs: Sequence[np.ndarray], batch_size: int, score_threshold: float, top_k: int
) -> list[dict[str, Tensor]]:
    """A graph's flat detections (boxes, scores, labels, image_index; sorted by image, then by
    score) as ``SSD.detect``'s per-image dicts, with a score threshold and top-k at least as
    strict as the graph's applied."""
    boxes, scores, labels, image = (torch.from_numpy(np.asarray(a)) for a in outputs)
    keep = scores > score_threshold  # the graph's own test
    counts = torch.bincount(image[keep], minlength=batch_size).tolist()
    return [  # each image's detections are sorted by score: its top-k is a prefix
        {"boxes": b[:top_k], "scores": s[:top_k], "labels": lab[:top_k]}
        for b, s, lab in zip(
            boxes[keep].split(counts),
            scores[keep].split(counts),
            labels[keep].split(counts),
            strict=True,
        )
    ]
