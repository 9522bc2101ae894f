"""COCO evaluation of a trained model: ``python -m ssd_lightning.evaluate ckpt_path=...``.

Loads a Lightning ``.ckpt`` or an exported ``ssd_resnet34_pennfudan_best.pt`` (the network and
its anchors come from the file), runs the validation split (or, with ``data.val_size=0``, every
image) through the same validation step as training, prints a COCO table and writes a JSON file.

Examples::

    python -m ssd_lightning.evaluate ckpt_path=outputs/2026-01-01/12-00-00/checkpoints/last.ckpt
    python -m ssd_lightning.evaluate ckpt_path=model.pt model.evaluate.score_threshold=0.05
    python -m ssd_lightning.evaluate ckpt_path=model.pt data.root=/data/other data.split=null \\
        data.verify=none
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ssd_lightning.config import (
    ConfigError,
    config_path_or_exit,
    instantiate_checked,
    run_task,
    validate_config,
)

log = logging.getLogger(__name__)

_ROWS = [  # (key, COCO description)
    ("map", "AP   @[IoU=0.50:0.95 | area=   all | maxDets=100]"),
    ("map_50", "AP   @[IoU=0.50      | area=   all | maxDets=100]"),
    ("map_75", "AP   @[IoU=0.75      | area=   all | maxDets=100]"),
    ("map_small", "AP   @[IoU=0.50:0.95 | area= small | maxDets=100]"),
    ("map_medium", "AP   @[IoU=0.50:0.95 | area=medium | maxDets=100]"),
    ("map_large", "AP   @[IoU=0.50:0.95 | area= large | maxDets=100]"),
    ("mar_1", "AR   @[IoU=0.50:0.95 | area=   all | maxDets=  1]"),
    ("mar_10", "AR   @[IoU=0.50:0.95 | area=   all | maxDets= 10]"),
    ("mar_100", "AR   @[IoU=0.50:0.95 | area=   all | maxDets=100]"),
    ("mar_small", "AR   @[IoU=0.50:0.95 | area= small | maxDets=100]"),
    ("mar_medium", "AR   @[IoU=0.50:0.95 | area=medium | maxDets=100]"),
    ("mar_large", "AR   @[IoU=0.50:0.95 | area= large | maxDets=100]"),
]


def format_table(metrics: dict[str, Any]) -> str:
    """COCO-style table; -1 (no GT of that size) is shown as n/a."""
    lines = []
    for key, desc in _ROWS:
        if key in metrics and metrics[key] is not None:
            v = metrics[key]
            lines.append(f"  {desc} = {'  n/a' if v < 0 else f'{v:.3f}'}   ({key})")
    if "val/loss" in metrics:
        lines.append(f"  val/loss = {metrics['val/loss']:.4f}")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on the configured data; returns the COCO metrics (also written
    to ``cfg.output``)."""
    import lightning as L

    from ssd_lightning.callbacks import write_metrics_json
    from ssd_lightning.lit_module import SSDLitModule, load_net

    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={ckpt}: no such file (a .ckpt from <run>/checkpoints/ or an "
                          "exported ssd_resnet34_pennfudan_best.pt)")
    try:
        net, info = load_net(ckpt)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    with open_dict(cfg):  # the images must match the network's input size
        cfg.model.net.image_size = int(net.image_size)
        cfg.data.image_size = int(net.image_size)
    validate_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed))
    datamodule = instantiate_checked(cfg.data, "data")
    module = SSDLitModule(
        net=net,
        loss=instantiate_checked(cfg.model.loss, "model.loss"),
        predict=info.get("predict"),
        evaluate=OmegaConf.to_container(cfg.model.evaluate),
    )
    trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=[])
    datamodule.setup("validate")
    use_val = int(cfg.data.get("val_size", 1)) > 0
    loader = datamodule.val_dataloader() if use_val else datamodule.test_dataloader()
    if not use_val:
        log.warning("data.val_size=0: evaluating on every image, including the training images")
    results = trainer.validate(module, dataloaders=loader, verbose=False)
    metrics: dict[str, Any] = dict(module.last_map)
    metrics = {k: v for k, v in metrics.items() if not k.endswith("_per_class")}
    if results and "val/loss" in results[0]:
        metrics["val/loss"] = float(results[0]["val/loss"])
    metrics.update(
        checkpoint=str(ckpt),
        split="val" if use_val else "all",
        num_images=len(loader.dataset),
        anchors=str(net.config.get("anchors", {}).get("name", "?")),
        image_size=int(net.image_size),
        **{f"threshold_{k}": v for k, v in module.eval_cfg.items()},
    )
    if trainer.is_global_zero:
        out = write_metrics_json(cfg.output, metrics)
        print(f"\nCOCO bbox metrics, {metrics['num_images']} images ({metrics['split']}), {ckpt}:")
        print(format_table(metrics))
        print(f"written to {out}")
    return metrics


def _run(cfg: DictConfig) -> None:
    run_task(evaluate, cfg)


def main() -> None:
    path = config_path_or_exit()
    hydra.main(version_base="1.3", config_path=path, config_name="evaluate")(_run)()


if __name__ == "__main__":
    main()
