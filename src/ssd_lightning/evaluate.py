"""COCO evaluation of a trained model: ``python -m ssd_lightning.evaluate ckpt_path=...``.

Loads a Lightning ``.ckpt`` or an exported ``ssd_resnet34_best.pt`` (the network and
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from ssd_lightning.config.cli import hydra_main
from ssd_lightning.config.compose import instantiate_checked
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.training.checkpoint import CheckpointError, load_model
from ssd_lightning.training.classes import use_model_classes
from ssd_lightning.training.lit_module import SSDLitModule
from ssd_lightning.training.run_outputs import write_metrics_json

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


# trainer settings of an evaluation: one device, the whole split, nothing written
_EVAL_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "sync_batchnorm": False,
    "limit_val_batches": None,
    "overfit_batches": 0.0,
    "fast_dev_run": False,
}


def run_eval_config(run_cfg: DictConfig, ckpt_path: str | Path, output: str | Path) -> DictConfig:
    """The evaluate config that matches a training run (``test_after_fit``): this tool's config
    with the run's data (its root, split, val_size, batch size, ...), evaluation thresholds,
    seed and device (the loss is the model's own, stored with it), i.e.
    ``python -m ssd_lightning.evaluate ckpt_path=<file>`` with those values as overrides. The
    whole validation split is evaluated (``trainer.limit_val_batches`` of the run does not
    apply)."""

    def plain(key: str) -> Any:
        return OmegaConf.to_container(OmegaConf.select(run_cfg, key), resolve=True)

    data = {**plain("data"), "augmentation": None, "image_size": None}  # as evaluate.yaml
    trainer = {**plain("trainer"), **_EVAL_TRAINER}
    trainer["default_root_dir"] = str(Path(output).parent)
    return OmegaConf.create(
        {
            "ckpt_path": str(ckpt_path),
            "seed": OmegaConf.select(run_cfg, "seed"),
            "output": str(output),
            "data": data,
            "model": {"evaluate": plain("model.evaluate")},
            "trainer": trainer,
        }
    )


def format_per_class(per_class: dict[str, float]) -> str:
    """Per-class AP@[.50:.95] rows (-1, no GT of that class, as n/a)."""
    width = max(len(n) for n in per_class)
    return "\n".join(
        f"  AP   @[IoU=0.50:0.95] {name:<{width}} = {'  n/a' if v < 0 else f'{v:.3f}'}"
        for name, v in per_class.items()
    )


def _print_report(text: str) -> None:
    print(f"\n{text}")


def _check_output(output: str | Path) -> None:
    """``output`` can be written: not a folder nor another kind of file (a photo given by
    mistake would be replaced), its folder there or creatable."""
    out = Path(str(output)).expanduser()
    if out.is_dir():
        raise ConfigError(f"output={out}: is a folder; give the path of a .json file")
    if out.exists() and out.suffix.lower() != ".json":
        raise ConfigError(
            f"output={out}: an existing file that is not .json, left as it is; give the path of "
            "a .json file"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output={out}: cannot create {out.parent} ({e.strerror})") from None


def evaluate(cfg: DictConfig, show: Callable[[str], Any] = _print_report) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on the configured data; returns the COCO metrics (also written
    to ``cfg.output``). ``show`` receives the report (header, table, file written)."""
    _check_output(cfg.output)  # before the evaluation: its result must have somewhere to go
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    net, info = load_model(ckpt)
    with open_dict(cfg):  # the images must match the network's input size
        cfg.data.image_size = int(net.image_size)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed))
    if cfg.model.get("loss") is None:  # as the model was trained (the design's when unknown)
        try:
            loss = MultiBoxLoss(**(info.get("loss") or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"ckpt_path={ckpt}: its stored loss does not build ({e})"
            ) from None
    else:
        loss = instantiate_checked(cfg.model.loss, "model.loss")
    try:  # its own check of model.evaluate.* (score / NMS thresholds, top-k) names the key
        module = SSDLitModule(
            net=net, loss=loss, evaluate=OmegaConf.to_container(cfg.model.evaluate)
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with open_dict(cfg):  # the data's classes are the checkpoint's, not checked against config
        cfg.data.num_classes = None
    datamodule = instantiate_checked(cfg.data, "data")
    names = list(info.get("class_names") or [])
    if not names:  # a model file from before the names travelled with it: the data's, by label
        if len(datamodule.class_names) != net.num_classes:
            raise ConfigError(
                f"ckpt_path={ckpt}: the model has {net.num_classes - 1} class(es) but the data "
                f"has {len(datamodule.class_names) - 1} ({', '.join(datamodule.class_names[1:])})"
            )
        names = datamodule.class_names
    # matched by name: the data renumbered as the model's, or refused (training.classes)
    use_model_classes(datamodule, names, f"ckpt_path={ckpt}")
    module.class_names = names
    trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=[])
    datamodule.prepare_data()  # verify (and with data.download=true fetch) the images
    datamodule.setup("validate")
    use_val = datamodule.val_set is not None
    loader = datamodule.val_dataloader() if use_val else datamodule.test_dataloader()
    if not use_val:
        log.warning("data.val_size=0: evaluating on every image, including the training images")
    results = trainer.validate(module, dataloaders=loader, verbose=False)
    metrics: dict[str, Any] = {
        k: v for k, v in module.last_map.items() if not k.endswith("_per_class")
    }
    if results and "val/loss" in results[0]:
        metrics["val/loss"] = float(results[0]["val/loss"])
    split = datamodule.split_description(use_val)
    if module.last_map_per_class:
        metrics["map_per_class"] = dict(module.last_map_per_class)
    metrics.update(
        checkpoint=str(ckpt),
        split=split,
        num_images=len(loader.dataset),
        anchors=str(net.config.get("anchors", {}).get("name", "?")),
        image_size=int(net.image_size),
        **{f"threshold_{k}": v for k, v in module.eval_cfg.items()},
    )
    if trainer.is_global_zero:
        out = write_metrics_json(cfg.output, metrics)
        per_class = ""
        if module.last_map_per_class:
            per_class = f"\nper class:\n{format_per_class(module.last_map_per_class)}"
        show(
            f"COCO bbox metrics, {metrics['num_images']} images ({split}), {ckpt}:\n"
            f"{format_table(metrics)}{per_class}\nwritten to {out}"
        )
    return metrics


main = hydra_main("evaluate", evaluate)


if __name__ == "__main__":
    main()
