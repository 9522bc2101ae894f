"""Ship a trained model as ONNX: ``python -m ssd_lightning.export ckpt_path=...``.

Writes the detector graph ``<name>.onnx`` (images and original sizes in; boxes, scores, labels
out, like ``SSD.detect``), its two halves ``<name>_network.onnx`` (loc, logits) and
``<name>_postprocess.onnx`` (decode, threshold, NMS, top-k) and ``<name>.json``, then runs them in
onnxruntime on real images against the PyTorch model (see ``tools.onnx_parity``). Needs the
``onnx`` extra: ``pip install -e '.[onnx]'``.

Examples::

    python -m ssd_lightning.export ckpt_path=outputs/<date>/<time>/ssd_resnet34_best.pt
    python -m ssd_lightning.export ckpt_path=last.ckpt score_threshold=0.3 output_dir=ship/
    python -m ssd_lightning.predict ckpt_path=ship/last.onnx input=street.jpg
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ssd_lightning.config.cli import hydra_main
from ssd_lightning.tools.onnx_export import export_model
from ssd_lightning.tools.onnx_parity import parity_summary


def export(cfg: DictConfig) -> dict[str, Any]:
    check = cfg.get("check") or {}
    meta = export_model(
        cfg.ckpt_path,
        cfg.output_dir,
        fmt=str(cfg.format),
        opset=cfg.opset,
        name=cfg.get("name"),
        thresholds={k: cfg.get(k) for k in ("score_threshold", "nms_threshold", "top_k")},
        check_folder=check.get("images") if check.get("enabled", True) else None,
        check_count=int(check.get("num_images", 8)),
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


main = hydra_main("export", export)


if __name__ == "__main__":
    main()
