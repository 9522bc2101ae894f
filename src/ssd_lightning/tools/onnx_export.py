"""A trained SSD as ONNX graphs (the export tool, ``tools.export``, checks them in onnxruntime).

Three graphs, each with a dynamic batch axis B; network + postprocess = detector:

- ``<stem>.onnx``, the detector: ``images`` (B,3,S,S) float32 RGB in [0, 1] (resized to S x S;
  the graph normalizes) and ``orig_sizes`` (B,2) int64 (height, width) -> ``boxes`` (D,4) float32
  xyxy in original image pixels, ``scores`` (D,), ``labels`` (D,) int64, ``image_index`` (D,)
  int64, sorted by image, then by score. It is ``SSD.forward`` followed by
  ``core.postprocess.select_detections``, the very code ``SSD.detect`` runs, traced by
  ``torch.export``; the thresholds are fixed at export.
- ``<stem>_network.onnx``: ``images`` -> ``loc`` (B,N,4) encoded offsets, ``logits`` (B,N,C)
  and ``anchors`` (N,4) cxcywh normalized.
- ``<stem>_postprocess.onnx``: ``loc``, ``logits``, ``orig_sizes`` -> the detector's outputs
  (decode, score threshold, NMS, top-k), for a network run elsewhere (e.g. TensorRT).

Each carries its description (input size, normalization, thresholds, anchor preset, class names)
in its metadata under ``ssd_lightning``; ``<stem>.json`` beside them holds the same and the result
of the parity check (``tools.onnx_parity``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssd_lightning.config.errors import ExportCheckError
from ssd_lightning.config.extras import require
from ssd_lightning.core.box_coding import VARIANCES
from ssd_lightning.core.postprocess import select_detections
from ssd_lightning.core.ssd import IMAGENET_MEAN, IMAGENET_STD, SSD
from ssd_lightning.data.dataset import CLASS_NAMES
from ssd_lightning.tools.onnx_runtime import DETECTOR, METADATA_KEY, NETWORK, POSTPROCESS

MIN_OPSET = 18  # the exporter's own opsets; lower ones go through a lossy version converter


class Network(nn.Module):
    """The bare network, with its anchors as a third output (what decoding needs)."""

    def __init__(self, net: SSD):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc, logits = self.net(images)
        return loc, logits, self.net.anchors_cxcywh


class Postprocess(nn.Module):
    """The post-processing: ``select_detections`` with the anchors and thresholds fixed."""

    def __init__(
        self,
        net: SSD,
        score_threshold: float,
        nms_threshold: float,
        top_k: int,
        pre_nms_top_k: int | None = None,
    ):
        super().__init__()
        self.register_buffer("anchors_cxcywh", net.anchors_cxcywh.clone(), persistent=False)
        self.thresholds = (score_threshold, nms_threshold, top_k, pre_nms_top_k)

    def forward(
        self, loc: Tensor, logits: Tensor, orig_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return select_detections(loc, logits, self.anchors_cxcywh, orig_sizes, *self.thresholds)


class Detector(nn.Module):
    """The detector: the network, then its post-processing (what ``SSD.detect`` runs)."""

    def __init__(
        self,
        net: SSD,
        score_threshold: float,
        nms_threshold: float,
        top_k: int,
        pre_nms_top_k: int | None = None,
    ):
        super().__init__()
        self.network = Network(net)
        self.postprocess = Postprocess(net, score_threshold, nms_threshold, top_k, pre_nms_top_k)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loc, logits, _ = self.network(images)
        return self.postprocess(loc, logits, orig_sizes)


def describe(net: SSD, info: Mapping[str, Any], thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """The description stored with the graphs (and in the JSON sidecar)."""
    num_classes = int(net.num_classes)
    names = list(info.get("class_names") or CLASS_NAMES)
    return {
        "image_size": int(net.image_size),
        "input": "RGB, resized to image_size x image_size, float32 in [0, 1], NCHW",
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "in_graph": True},
        "thresholds": dict(thresholds),
        "class_names": names[:num_classes] + [str(i) for i in range(len(names), num_classes)],
        "num_classes": num_classes,
        "num_anchors": int(net.num_anchors),
        "anchors": net.config["anchors"],
        "feature_sizes": [list(s) for s in net.feature_sizes],
        "box_coding": {"variances": list(VARIANCES), "anchors": "cxcywh, normalized to [0, 1]"},
        "detector_outputs": {
            "boxes": "(D,4) float32 xyxy in original image pixels",
            "scores": "(D,) float32",
            "labels": "(D,) int64, 1..num_classes-1",
            "image_index": "(D,) int64, index in the batch; sorted by image, then by score",
        },
        "network_outputs": {
            "loc": "(B,N,4) encoded offsets",
            "logits": "(B,N,num_classes), class 0 = background",
            "anchors": "(N,4) cxcywh normalized",
        },
    }


def _stable_sort(self: Any, stable: Any = None, dim: int = -1, descending: bool = False) -> Any:
    """``aten.sort.stable`` (which select_detections uses) in ONNX: TopK over the whole axis,
    which lists equal values by index, i.e. sorts stably."""
    from onnxscript import opset18 as op  # lazy: an optional dependency, needed only to export

    size = op.Shape(self, start=dim, end=dim + 1 if dim != -1 else None)
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints and logs its every step and warns about things no user can act on
    (e.g. onnx_ir: an initializer that is also an output, the anchors, is not deduplicated); its
    failures raise."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    names: tuple[Sequence[str], Sequence[str]],
    opset: int,
    meta: dict[str, Any],
) -> None:
    inputs, outputs = names
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            verbose=False,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes={name: {0: batch} for name in inputs},
            opset_version=opset,
            custom_translation_table={torch.ops.aten.sort.stable: _stable_sort},
        )
    written = program.model.opset_imports.get("")
    if written != opset:  # a failed version conversion keeps the exporter's opset, quietly
        raise ExportCheckError(f"opset={opset}: the exporter could only write opset {written}")
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    with _quiet_exporter():  # saving runs the exporter's passes too
        program.save(str(path), external_data=False)


def export_onnx(
    net: SSD,
    info: Mapping[str, Any],
    out_dir: str | Path,
    stem: str,
    thresholds: Mapping[str, Any],
    opset: int = MIN_OPSET,
    source: str = "",
    graphs: Sequence[str] = (DETECTOR, NETWORK, POSTPROCESS),
) -> dict[str, Any]:
    """Write the detector ``<stem>.onnx``, ``<stem>_network.onnx`` and ``<stem>_postprocess.onnx``
    (those of ``graphs``); returns their description (with the paths). ``thresholds``:
    score_threshold, nms_threshold, top_k."""
    require("onnxscript", "onnxscript", "onnx", "ONNX export")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu", torch.float32).eval()
    names = {DETECTOR: f"{stem}.onnx", NETWORK: f"{stem}_network.onnx"}
    names[POSTPROCESS] = f"{stem}_postprocess.onnx"
    files = {graph: out / names[graph] for graph in graphs}
    meta = describe(net, info, thresholds) | {
        "source": source,
        "opset": opset,
        "torch": torch.__version__,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **{graph: path.name for graph, path in files.items()},
    }
    s = int(net.image_size)
    images = torch.rand(2, 3, s, s)  # batch 2: a batch of 1 would be specialized to 1
    sizes = torch.tensor([[s, s], [2 * s, s]])
    fixed = [thresholds[k] for k in ("score_threshold", "nms_threshold", "top_k")]
    fixed.append(thresholds.get("pre_nms_top_k"))  # None (no cap) at the predict settings
    detections = ("boxes", "scores", "labels", "image_index")
    with torch.no_grad():
        loc, logits = net(images)
        specs = {  # module, example inputs, input names, output names
            DETECTOR: (
                Detector(net, *fixed),
                (images, sizes),
                ("images", "orig_sizes"),
                detections,
            ),
            NETWORK: (Network(net), (images,), ("images",), ("loc", "logits", "anchors")),
            POSTPROCESS: (
                Postprocess(net, *fixed),
                (loc, logits, sizes),
                ("loc", "logits", "orig_sizes"),
                detections,
            ),
        }
        for graph in graphs:
            module, args, inputs, outputs = specs[graph]
            meta_graph = meta | {"graph": graph}
            _export_graph(module, args, files[graph], (inputs, outputs), opset, meta_graph)
    return meta | {"files": {k: str(v) for k, v in files.items()}}
