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

from ssd_lightning.config.cli import hydra_main
from ssd_lightning.tools.export import export

main = hydra_main("export", export)


if __name__ == "__main__":
    main()
