"""The export tool: a model file (``.ckpt`` / ``.pt``) -> the ONNX graphs of ``tools.onnx_export``
and ``<stem>.json``, checked in onnxruntime against the PyTorch model (``tools.onnx_parity``).
``export(cfg)`` is the task of ``python -m ssd_lightning.export``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssd_lightning.config.atomic import write_json
from ssd_lightning.config.errors import ConfigError, ExportCheckError
from ssd_lightning.config.extras import require
from ssd_lightning.config.validation import flag
from ssd_lightning.core.plain import is_int
from ssd_lightning.core.postprocess import check_thresholds
from ssd_lightning.tools.onnx_export import MIN_OPSET, export_onnx
from ssd_lightning.tools.onnx_parity import check_images, check_parity, parity_summary
from ssd_lightning.training.checkpoint import load_model

FORMATS = ("onnx",)


def newest_opset() -> int:
    """The newest opset the installed onnx knows: the exporter's version converter cannot go past
    it (it then keeps its own opset 18 and says nothing)."""
    return int(require("onnx", "onnx", "onnx", "ONNX export").defs.onnx_opset_version())


def check_export_options(fmt: str, opset: Any, stem: str | None) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: allowed values are {', '.join(FORMATS)}")
    if not is_int(opset, MIN_OPSET):
        raise ConfigError(f"opset={opset!r}: allowed values are integers >= {MIN_OPSET}")
    if opset > (newest := newest_opset()):
        raise ConfigError(
            f"opset={opset}: allowed values are {MIN_OPSET}..{newest} (the newest this onnx knows)"
        )
    if stem is not None and (not stem or "/" in stem or stem.startswith(".")):
        raise ConfigError(f"name={stem!r}: a file name without folders (e.g. ssd_pennfudan)")


def export_model(
    ckpt_path: str | Path,
    out_dir: str | Path,
    fmt: str = "onnx",
    opset: int = MIN_OPSET,
    name: str | None = None,
    thresholds: Mapping[str, Any] | None = None,
    check_folder: str | Path | None = None,
    check_count: int = 8,
) -> dict[str, Any]:
    """Export the model of a ``.ckpt`` / ``.pt`` file; thresholds default to those stored with
    the model (its ``predict`` ones). With ``check_folder``, the parity check on its images runs
    (an ``ExportCheckError`` when it fails; the files stay, for a look). Returns the sidecar."""
    check_export_options(fmt, opset, name)
    given = {k: v for k, v in (thresholds or {}).items() if v is not None}
    try:
        given = check_thresholds(given, "export")
    except ValueError as e:
        raise ConfigError(str(e).removeprefix("export.")) from None
    if check_folder is not None:
        require(
            "onnxruntime", "onnxruntime", "onnx", "the parity check (check.enabled=false skips it)"
        )
        if not is_int(check_count, 1):
            raise ConfigError(
                f"check.num_images={check_count!r}: allowed values are integers >= 1 (or "
                "check.enabled=false)"
            )
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out}: is a file, not a folder")
    try:  # before the model loads: a mistake here costs no time
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir={out}: cannot create it ({e.strerror})") from None
    net, info = load_model(ckpt_path)
    stem = name or Path(str(ckpt_path)).stem
    chosen = {**info["predict"], **given}
    if check_folder is not None:  # before the export: a folder without photos costs no time
        images, sizes, files = check_images(check_folder, check_count, int(net.image_size))
    meta = export_onnx(net, info, out_dir, stem, chosen, opset, source=str(ckpt_path))
    if check_folder is not None:
        parity = check_parity(net, meta, images, sizes)
        parity["folder"] = str(check_folder)
        meta["parity"] = parity
    sidecar = out / f"{stem}.json"
    write_json(sidecar, meta)
    meta["files"]["sidecar"] = str(sidecar)
    parity = meta.get("parity")
    if parity is not None and not parity["ok"]:
        raise ExportCheckError(
            f"parity check failed: onnxruntime vs PyTorch on {parity['images']} images of "
            f"{parity['folder']}:\n{parity_summary(parity)}\nThe files are kept: {sidecar}"
        )
    return meta


def export(cfg: DictConfig) -> dict[str, Any]:
    check = cfg.get("check") or {}
    meta = export_model(
        cfg.ckpt_path,
        cfg.output_dir,
        fmt=str(cfg.format),
        opset=cfg.opset,
        name=cfg.get("name"),
        thresholds={k: cfg.get(k) for k in ("score_threshold", "nms_threshold", "top_k")},
        check_folder=check.get("images") if flag(cfg, "check.enabled", True) else None,
        check_count=check.get("num_images", 8),
    )
    for kind, path in meta["files"].items():
        print(f"{kind:11s} {path}")
    parity = meta.get("parity")
    if parity:
        print(f"parity with PyTorch on {parity['images']} images of {parity['folder']}:")
        print(parity_summary(parity))
    print(
        f"predict with it: python -m ssd_lightning.predict ckpt_path={meta['files']['detector']} "
        "input=<image or folder>"
    )
    return meta
