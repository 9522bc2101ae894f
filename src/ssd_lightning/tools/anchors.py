"""How well an anchor preset covers the training boxes, and fitting a new preset to them.

    python -m ssd_lightning.anchors [overrides]                     # report on the selected preset
    python -m ssd_lightning.anchors anchors=ssd model.net.image_size=512
    python -m ssd_lightning.anchors fit --name fitted [overrides]   # conf/anchors/fitted.yaml

Overrides are the training overrides (same config tree), so the report describes exactly the
anchors a training run with them would use. Ground truth: the training split's boxes after the
resize to the square network input, i.e. xyxy normalized to [0, 1] of the original image.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from ssd_lightning.config.compose import compose, instantiate_checked
from ssd_lightning.config.errors import ConfigError, ToolParser
from ssd_lightning.config.paths import config_dir, project_root
from ssd_lightning.config.validation import validate_config
from ssd_lightning.core.anchors import (
    COMPACT_KEYS,
    AnchorPairs,
    anchor_pairs,
    compact_base,
    fitted_override_note,
    generate_anchors,
)
from ssd_lightning.core.backbone import ResNet34Backbone
from ssd_lightning.visualize import plot_anchor_shapes

PRESET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # a file name and a Hydra option


def training_boxes(cfg: DictConfig) -> Tensor:
    """GT boxes of the training split, (G, 4) xyxy normalized to the image (any dataset: the
    configured DataModule reads them)."""
    return instantiate_checked(cfg.data, "data").training_boxes()


def feature_sizes(image_size: int) -> list[tuple[int, int]]:
    return ResNet34Backbone(image_size, weights="none").feature_sizes


def coverage(gt: Tensor, anchors_xyxy: Tensor, iou_threshold: float = 0.5) -> dict[str, float]:
    """gt (G, 4) and anchors (N, 4), xyxy normalized -> how well the anchors can match the boxes.

    best possible recall (bpr): share of boxes whose best anchor reaches ``iou_threshold`` (the
    matcher forces a positive for every box anyway, but one with low IoU is a poor target).
    """
    iou = box_iou(gt, anchors_xyxy)  # (G, N)
    best = iou.max(1).values
    return {
        "boxes": len(gt),
        "best_iou_min": best.min().item(),
        "best_iou_median": best.median().item(),
        "best_iou_mean": best.mean().item(),
        "bpr": (best >= iou_threshold).float().mean().item(),
        "positives_per_box": (iou >= iou_threshold).sum(1).float().mean().item(),
    }


def report(cfg: DictConfig, gt: Tensor | None = None) -> dict:
    """Anchors per map and in total for the configured preset, and its coverage of ``gt``."""
    anchors_cfg = OmegaConf.to_container(cfg.anchors, resolve=True)
    pairs = anchor_pairs(anchors_cfg)
    sizes = feature_sizes(cfg.model.net.image_size)
    anchors = generate_anchors(sizes, pairs, clip=bool(anchors_cfg.get("clip", True)))
    gt = training_boxes(cfg) if gt is None else gt
    maps = [
        {
            "size": f"{h}x{w}",
            "per_location": len(level),
            "anchors": h * w * len(level),
            "pairs": [(round(s, 4), round(r, 4)) for s, r in level],
        }
        for (h, w), level in zip(sizes, pairs, strict=True)
    ]
    return {
        "preset": anchors_cfg.get("name", "?"),
        "image_size": cfg.model.net.image_size,
        "maps": maps,
        "total": anchors.shape[0],
        "coverage": coverage(
            gt, box_convert(anchors, "cxcywh", "xyxy"), cfg.model.loss.iou_threshold
        ),
    }


def format_report(rep: dict) -> str:
    lines = [f"anchor preset {rep['preset']} at {rep['image_size']}x{rep['image_size']}", ""]
    lines.append(f"{'map':>7}  {'A':>2}  {'anchors':>7}  (scale, ratio=w/h) pairs")
    for m in rep["maps"]:
        pairs = ", ".join(f"({s:g}, {r:g})" for s, r in m["pairs"])
        lines.append(f"{m['size']:>7}  {m['per_location']:>2}  {m['anchors']:>7}  {pairs}")
    lines.append(f"{'total':>7}      {rep['total']:>7}")
    c = rep["coverage"]
    lines += [
        "",
        f"coverage of {c['boxes']} training boxes (resized to the square input):",
        f"  best IoU per box      min {c['best_iou_min']:.3f}  median {c['best_iou_median']:.3f}"
        f"  mean {c['best_iou_mean']:.3f}",
        f"  best possible recall  {c['bpr']:.1%} of boxes have an anchor with IoU >= threshold",
        f"  positives per box     {c['positives_per_box']:.1f} anchors at IoU >= threshold",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# fitting


def _shape_iou(wh: Tensor, centers: Tensor) -> Tensor:
    """IoU of boxes (G, 2) and cluster shapes (K, 2), all centered at the same point -> (G, K)."""
    inter = torch.minimum(wh[:, None], centers[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + centers.prod(-1)[None] - inter)


def kmeans_shapes(wh: Tensor, k: int, seed: int = 0, iters: int = 100) -> Tensor:
    """k-means on box shapes (G, 2) with 1 - IoU as the distance -> (k, 2) cluster shapes."""
    gen = torch.Generator().manual_seed(seed)
    # k-means++ seeding, with 1 - IoU as the distance
    centers = wh[torch.randint(len(wh), (1,), generator=gen)]
    while len(centers) < k:
        d = (1 - _shape_iou(wh, centers)).min(1).values
        pick = torch.multinomial(d.clamp(min=1e-12) ** 2, 1, generator=gen)
        centers = torch.cat([centers, wh[pick]])
    for _ in range(iters):
        assign = _shape_iou(wh, centers).argmax(1)
        new = torch.stack(
            [
                wh[assign == j].median(0).values if (assign == j).any() else centers[j]
                for j in range(k)  # k clusters, not images or anchors
            ]
        )
        if torch.allclose(new, centers):
            break
        centers = new
    return centers


def fit_pairs(gt: Tensor, band: Tensor, start: AnchorPairs, seed: int = 0) -> AnchorPairs:
    """Per map, k-means the shapes of the boxes in its scale band into as many anchors as it has.

    gt (G, 4) xyxy normalized; band (G,) the map each box belongs to. A map with fewer boxes than
    anchors keeps its starting pairs.
    """
    wh = (gt[:, 2:] - gt[:, :2]).clamp(min=1e-4)
    pairs = []
    for m, level in enumerate(start):  # six maps
        members = wh[band == m]
        if len(members) < len(level):
            pairs.append(list(level))
            continue
        centers = kmeans_shapes(members, len(level), seed)
        pairs.append([(math.sqrt(w * h), w / h) for w, h in centers.tolist()])
    return pairs


def fit(cfg: DictConfig, name: str, seeds: int = 8, gt: Tensor | None = None) -> dict:
    """Fit a preset with the current preset's anchors per map.

    Each box is assigned to the map of its best anchor in the current preset (its scale band);
    each map's shapes are then fitted to its boxes. Of ``seeds`` k-means restarts the best by best
    possible recall, then mean best IoU, is kept — and the current preset itself stays a candidate,
    so the fitted preset never covers the training boxes worse than the one it started from.
    """
    anchors_cfg = OmegaConf.to_container(cfg.anchors, resolve=True)
    start = anchor_pairs(anchors_cfg)
    sizes = feature_sizes(cfg.model.net.image_size)
    gt = training_boxes(cfg) if gt is None else gt
    thr = cfg.model.loss.iou_threshold
    clip = bool(anchors_cfg.get("clip", True))  # the fitted preset keeps the current one's

    def score(pairs: AnchorPairs) -> dict[str, float]:
        anchors = generate_anchors(sizes, pairs, clip=clip)
        return coverage(gt, box_convert(anchors, "cxcywh", "xyxy"), thr)

    start_anchors = box_convert(generate_anchors(sizes, start, clip=clip), "cxcywh", "xyxy")
    map_of_anchor = torch.repeat_interleave(
        torch.arange(len(sizes)),
        torch.tensor([h * w * len(level) for (h, w), level in zip(sizes, start, strict=True)]),
    )
    band = map_of_anchor[box_iou(gt, start_anchors).argmax(1)]  # (G,)
    before = score(start)
    scored = [(before, start)]
    scored += [(score(p), p) for p in (fit_pairs(gt, band, start, seed) for seed in range(seeds))]
    after, pairs = max(scored, key=lambda sp: (sp[0]["bpr"], sp[0]["best_iou_mean"]))
    preset = {
        "name": name,
        "clip": clip,
        "pairs": [[[round(s, 4), round(r, 4)] for s, r in level] for level in pairs],
    }
    base = compact_base(anchors_cfg)
    if base is not None:  # what an anchors.scales / anchors.ratios override builds on
        preset["fitted_from"] = base
    return {
        "preset": preset,
        "before": before,
        "after": after,
        "improved": pairs is not start,
        "started_from": anchors_cfg.get("name", "?"),
        "gt_wh": gt[:, 2:] - gt[:, :2],
    }


def write_preset(result: dict, directory: Path, force: bool = False) -> Path:
    preset = result["preset"]
    path = directory / "anchors" / f"{preset['name']}.yaml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; choose another --name or pass --force")
    b, a = result["before"], result["after"]
    header = (
        f"# {preset['name']} — fitted by `python -m ssd_lightning.anchors fit` from "
        f"{result['started_from']}:\n"
        f"# k-means (1 - IoU) on the {a['boxes']} training box shapes, the same anchors per map,\n"
        f"# smallest clusters on the finest map. Best possible recall {b['bpr']:.1%} -> "
        f"{a['bpr']:.1%}, mean best IoU {b['best_iou_mean']:.3f} -> {a['best_iou_mean']:.3f}.\n"
    )
    # scales / ratios present but null: an override of either is accepted by Hydra (not "not in
    # struct") and builds on fitted_from (see core.anchors)
    body = {**preset, **dict.fromkeys(COMPACT_KEYS)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(body, default_flow_style=None, sort_keys=False))
    return path


def _report(cfg: DictConfig, gt: Tensor, figure: Path | None) -> None:
    rep = report(cfg, gt)
    note = fitted_override_note(OmegaConf.to_container(cfg.anchors, resolve=True))
    if note:
        print(note)
    print(format_report(rep))
    if figure:
        pairs = anchor_pairs(OmegaConf.to_container(cfg.anchors, resolve=True))
        _save(plot_anchor_shapes(gt[:, 2:] - gt[:, :2], pairs, rep["preset"]), figure)


def _save(fig, path: Path) -> None:
    path = path.expanduser().resolve()  # relative to where the user is, as any CLI path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote figure {path}")


def _fit(cfg: DictConfig, gt: Tensor, args: argparse.Namespace) -> None:
    result = fit(cfg, args.name, args.seeds, gt)
    path = write_preset(result, config_dir(), args.force)
    b, a = result["before"], result["after"]
    print(f"fitted {args.name} from {result['started_from']} on {a['boxes']} training boxes")
    if not result["improved"]:
        print("  no fitted candidate beat the starting preset; the new preset repeats it")
    print(f"  best possible recall  {b['bpr']:.1%} -> {a['bpr']:.1%}")
    print(f"  mean best IoU         {b['best_iou_mean']:.3f} -> {a['best_iou_mean']:.3f}")
    print(f"wrote preset {path}; train with it: python -m ssd_lightning.train anchors={args.name}")
    figure = args.figure or project_root() / "outputs" / f"anchors_{args.name}.png"
    _save(plot_anchor_shapes(result["gt_wh"], anchor_pairs(result["preset"]), args.name), figure)


EPILOG = """
overrides (key=value, as for training; the groups this tool reads):
  anchors=<preset>            the preset to report on or start the fit from
  anchors.<key>=<value>       e.g. 'anchors.ratios=[0.5,0.33]'
  model.net.image_size=<S>    the network input (feature map sizes follow)
  model.loss.iou_threshold=<t> the matching IoU (best possible recall counts boxes >= t)
  data.val_size=<n>           the split whose training boxes are measured
  data=coco data.images_dir=<dir> data.train_json=<file>   your own COCO dataset's boxes
"""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in ("report", "fit") else "report"
    parser = ToolParser(
        prog="python -m ssd_lightning.anchors [report|fit]",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", default="fitted", help="fit: name of the new preset")
    parser.add_argument("--seeds", type=int, default=8, help="fit: k-means restarts")
    parser.add_argument("--force", action="store_true", help="fit: overwrite an existing preset")
    parser.add_argument("--figure", type=Path, help="write the box/anchor shape figure here")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}")
    if mode == "fit" and not PRESET_NAME.fullmatch(args.name):
        # the name is a file under conf/anchors/ and the option anchors=<name>: no path, no space
        raise ConfigError(
            f"--name {args.name!r}: allowed are letters, digits, _ and - (not first), "
            "e.g. --name my_fitted"
        )
    if args.figure is not None:  # before the fit writes its preset: the figure must fit too
        try:
            args.figure.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"--figure {args.figure}: cannot create its folder ({e.strerror})"
            ) from None
    cfg = compose("train", overrides, job_name="anchors")
    validate_config(cfg)
    gt = training_boxes(cfg)
    if mode == "report":
        _report(cfg, gt, args.figure)
    else:
        _fit(cfg, gt, args)
