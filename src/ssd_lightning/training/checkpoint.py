"""The one reader (and the writer) of trained-model files.

Two kinds of file hold a trained network:

- a Lightning checkpoint ``<run>/checkpoints/*.ckpt``: the whole training state; our entry
  ``checkpoint["ssd_lightning"]`` holds the network's constructor config and the thresholds
  (written by ``SSDLitModule.on_save_checkpoint``), the weights are ``state_dict["net.*"]``, or
  ``state_dict["ema.net.*"]`` (the moving average, the network the run validated) when the run
  kept one (``model.ema_decay``);
- the exported ``<run>/ssd_resnet34_best.pt``: ``{"config": SSD constructor args,
  "state_dict": ..., "predict": ..., "evaluate": ..., "loss": ..., "class_names": ...}``, no
  Lightning needed.

Both are read with ``torch.load(weights_only=True)``: a file that would run code when unpickled
is refused. This module imports no Lightning (``predict`` uses it on the exported file).
"""

from __future__ import annotations

import inspect
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.config.atomic import atomic_write
from ssd_lightning.config.errors import UserFileError
from ssd_lightning.core.anchors import anchor_pairs
from ssd_lightning.core.postprocess import EVALUATE_DEFAULTS, PREDICT_DEFAULTS
from ssd_lightning.core.ssd import SSD

CKPT_KEY = "ssd_lightning"  # our entry in Lightning checkpoints
NET_PREFIX = "net."  # the network's keys in a Lightning checkpoint's state_dict
EMA_PREFIX = "ema.net."  # its moving average's, preferred when present


class CheckpointError(UserFileError, ValueError):
    """A model file that is missing, unreadable or not written by ssd_lightning."""


def read_checkpoint(
    path: str | Path, key: str = "ckpt_path", map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """A .ckpt / .pt file as a dict, loaded weights-only whatever the environment says
    (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` only overrides calls that do not ask); ``key`` names
    the config entry. ``mmap``: tensors stay in the file until used (a quick look at the rest)."""
    if not isinstance(path, str | os.PathLike):  # key=null, key=[a,b] on the command line
        raise CheckpointError(
            f"{key}={path}: give one file (a Lightning .ckpt from <run>/checkpoints/ or an "
            "exported ssd_resnet34_best.pt)"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{key}={path}: no such file (a Lightning .ckpt from <run>/checkpoints/ or an "
            "exported ssd_resnet34_best.pt)"
        )
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{key}={path}: an ONNX model; give the .ckpt or exported .pt it was exported from "
            "(of the tools only predict runs .onnx)"
        )
    # mmap reads zip archives only; of any other file torch's complaint would be about mmap
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or unsafe: one clear message
        raise CheckpointError(
            f"{key}={path}: cannot read it as a PyTorch checkpoint ({_load_error(path, e)})"
        ) from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{key}={path}: not a checkpoint (a {type(blob).__name__})")
    return blob


def _load_error(path: Path, error: Exception) -> str:
    """Why ``torch.load`` refused a file: of one torch.save never wrote (an image, a text
    file), that; else torch's reason, without its advice to load without weights_only (running
    code from the file is what that would allow)."""
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip / legacy pickle
        return "not a file torch.save writes" + ("; it is empty" if not head else "")
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            reason = line.removeprefix("WeightsUnpickler error:").strip()
            reason = reason or (lines[i + 1] if i + 1 < len(lines) else "")
            # its first sentence: what was refused, not how to allow it
            return f"refused by the weights-only load: {reason.split('. ')[0]}"
        if "GLOBAL" in line and "Weights only load failed" in lines[0]:  # a blocked module
            return f"refused by the weights-only load: {line.split('. ')[0]}"
    return lines[0] if lines else type(error).__name__


def is_exported(blob: dict[str, Any]) -> bool:
    return "config" in blob and "state_dict" in blob and CKPT_KEY not in blob


def net_config(blob: dict[str, Any], path: str | Path = "?") -> dict[str, Any]:
    """The ``SSD`` constructor arguments stored in a checkpoint or exported file."""
    if is_exported(blob):
        return dict(blob["config"])
    if CKPT_KEY in blob and "state_dict" in blob:
        return dict(blob[CKPT_KEY]["net_config"])
    raise CheckpointError(
        f"ckpt_path={path}: neither a ssd_lightning Lightning checkpoint nor a model exported by "
        "ssd_lightning (ssd_resnet34_best.pt)"
    )


def net_state(blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's state dict from either kind of file (of a Lightning checkpoint: the moving
    average of the weights when the run kept one)."""
    if is_exported(blob):
        return blob["state_dict"]
    state = blob["state_dict"]
    prefix = EMA_PREFIX if any(k.startswith(EMA_PREFIX) for k in state) else NET_PREFIX
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_net(config: dict[str, Any], state: dict[str, torch.Tensor], path: str | Path) -> SSD:
    """An ``SSD`` from its constructor config and weights (no ImageNet weights fetched)."""
    try:
        net = SSD(**{**config, "weights": "none"})
        net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"ckpt_path={path}: its network does not load ({e})") from e
    net.config["weights"] = config.get("weights", "none")
    return net


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SSD, dict[str, Any]]:
    """The network of a Lightning ``.ckpt`` or an exported ``.pt``, in eval mode, and the info
    stored with it: ``predict`` / ``evaluate`` thresholds, ``loss`` (the ``MultiBoxLoss``
    arguments; None in files older than the option), ``class_names``, ``epoch``,
    ``global_step`` (where known)."""
    blob = read_checkpoint(path)
    net = build_net(net_config(blob, path), net_state(blob), path)
    if is_exported(blob):
        info = {k: v for k, v in blob.items() if k not in ("config", "state_dict")}
    else:
        entry = blob[CKPT_KEY]
        info = {
            "predict": entry.get("predict"),
            "evaluate": entry.get("evaluate"),
            "loss": entry.get("loss"),
            "class_names": entry.get("class_names"),
            "epoch": blob.get("epoch"),
            "global_step": blob.get("global_step"),
        }
    info["predict"] = {**PREDICT_DEFAULTS, **(info.get("predict") or {})}
    info["evaluate"] = {**EVALUATE_DEFAULTS, **(info.get("evaluate") or {})}
    return net.to(map_location).eval(), info


def export_model(net: SSD, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the Lightning-free file (atomically): the state dict, the constructor config and
    ``extra``."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_write(path) as tmp:
        torch.save({"config": dict(net.config), "state_dict": state, **(extra or {})}, tmp)
    return Path(path)


# what does not shape the trained network: the trunk's initial weights, the preset's name, the
# preset a fitted one came from (it shapes the anchors only through scales / ratios, compared)
_NOT_ARCHITECTURE = ("model.net.weights", "anchors.name", "anchors.fitted_from")


def _differences(stored: Any, wanted: Any, key: str) -> list[str]:
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in _differences(stored.get(k), wanted.get(k), f"{key}.{k}")]
    if key in _NOT_ARCHITECTURE or stored == wanted:
        return []
    return [f"{key}: checkpoint {stored!r}, config {wanted!r}"]


def _same_anchors(stored: Any, wanted: Any) -> bool:
    # the anchors they make, whatever else a preset records (a name, the preset it was fitted
    # from: a run made before a preset gained such a key resumes with it)
    if not (isinstance(stored, Mapping) and isinstance(wanted, Mapping)):
        return False
    try:
        same_pairs = anchor_pairs(stored) == anchor_pairs(wanted)
    except ValueError:
        return False
    return same_pairs and bool(stored.get("clip", True)) == bool(wanted.get("clip", True))


def architecture_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``<key>: checkpoint <a>, config <b>`` for every ``SSD`` argument on which a checkpoint's
    network (``net_config``) and a config's ``model.net`` (plain) differ, anchor preset entries
    one by one under their own ``anchors.`` keys. Missing arguments take ``SSD``'s defaults."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(SSD).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    stored = {**defaults, **stored}
    wanted = {**defaults, **{k: v for k, v in wanted.items() if not k.startswith("_")}}
    out = []
    for k in sorted(set(stored) | set(wanted)):
        if k == "anchors" and _same_anchors(stored.get(k), wanted.get(k)):
            continue
        key = "anchors" if k == "anchors" else f"model.net.{k}"  # anchors: the anchors group
        out += _differences(stored.get(k), wanted.get(k), key)
    return out
