"""Every picture the project draws: boxes on images, and the figures (augmented samples,
feature maps, predictions, anchor matching, anchor shapes, sweep summaries).

Figures use matplotlib's object API (``Figure``, no pyplot): nothing switches the global backend
or keeps figures alive, so they are safe in callbacks, scripts and notebooks alike.

Boxes drawn are xyxy in pixels of the image they come with (network-input pixels after a
training pipeline). Ground truth is green, predictions red.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from ssd_lightning.core.matching import match_anchors
from ssd_lightning.data.dataset import CLASS_NAMES

Sample = tuple[Tensor, dict]
GT_COLOR = "lime"
PRED_COLOR = "red"


def to_uint8(image: Tensor) -> Tensor:
    """(3,H,W) float [0,1] or uint8 -> uint8."""
    image = image.as_subclass(Tensor).detach().cpu()
    if image.dtype == torch.uint8:
        return image
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_sample(image: Tensor, boxes: Tensor, color: str = GT_COLOR, width: int = 2) -> Tensor:
    """uint8 (3,H,W) image with `boxes` (K,4) xyxy pixels drawn on it."""
    return draw_bounding_boxes(
        to_uint8(image), boxes.as_subclass(Tensor).detach().cpu().float(), colors=color, width=width
    )


def _label_texts(det: dict[str, Tensor], class_names: Sequence[str], show_class: bool) -> list[str]:
    labels = det.get("labels")
    ids = labels.tolist() if labels is not None else [1] * len(det["boxes"])
    return [
        (f"{class_names[c] if 0 <= c < len(class_names) else c} " if show_class else "")
        + f"{s:.2f}"
        for c, s in zip(ids, det["scores"].tolist(), strict=True)
    ]


def draw_detections(
    image: Tensor,
    det: dict[str, Tensor],
    gt_boxes: Tensor | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    width: int = 2,
    show_class: bool = True,
) -> Tensor:
    """image (3,H,W) float [0,1] or uint8; det boxes (K,4) and gt_boxes (G,4) xyxy in this
    image's pixels -> uint8 (3,H,W) with GT in green and predictions in red, labelled with their
    class (``show_class``) and score."""
    img = to_uint8(image)
    if gt_boxes is not None and len(gt_boxes):
        img = draw_bounding_boxes(
            img, gt_boxes.detach().float().cpu(), colors=GT_COLOR, width=width
        )
    if len(det["boxes"]):
        img = draw_bounding_boxes(
            img,
            det["boxes"].detach().float().cpu(),
            labels=_label_texts({k: v.cpu() for k, v in det.items()}, class_names, show_class),
            colors=PRED_COLOR,
            width=width,
        )
    return img


def prediction_grid(
    images: Tensor,
    detections: Sequence[dict[str, Tensor]],
    gt_boxes: Sequence[Tensor],
    ncols: int = 4,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Tensor:
    """A grid image uint8 (3,H',W') of ``images`` (n,3,S,S) with their detections and ground
    truth drawn (boxes in the images' pixels), e.g. for TensorBoard; the class names are written
    where there is more than one class."""
    show_class = len(class_names) > 2
    drawn = [  # drawing is per image by nature; a handful of images every few epochs
        draw_detections(img, det, gt, class_names=class_names, show_class=show_class)
        for img, det, gt in zip(images, detections, gt_boxes, strict=True)
    ]
    return make_grid(drawn, nrow=min(ncols, len(drawn)), padding=4)


def plot_augmentations(
    source: Sequence[Sample] | Sample,
    transform: Callable[..., Sample] | None = None,
    n: int = 8,
    index: int = 0,
    ncols: int = 4,
    seed: int | None = None,
    title: str | None = None,
) -> Figure:
    """Grid of `n` augmented versions of one sample, boxes drawn.

    source: a dataset (indexed with `index`; each access re-draws its augmentation) or one raw
    `(image, target)` sample, which then needs `transform`. `seed` seeds torch for a repeatable
    figure (the global generator state is restored afterwards).
    """
    is_sample = isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], dict)
    if is_sample and transform is None:
        raise ValueError("plot_augmentations: pass `transform` when `source` is a single sample")
    state = torch.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        draws: list[Any] = []
        for _ in range(n):
            if is_sample:
                img, tgt = transform(*source)
            else:
                img, tgt = source[index]
            draws.append((img, tgt))
    finally:
        if seed is not None:
            torch.set_rng_state(state)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3 * ncols, 3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, tgt) in zip(axes.flat, draws, strict=False):
        ax.imshow(draw_sample(img, tgt["boxes"]).permute(1, 2, 0).numpy())
        stage = tgt.get("fallback", 0)
        ax.set_title(
            f"{len(tgt['boxes'])} boxes" + (f", fallback {stage}" if stage else ""), fontsize=8
        )
    name = draws[0][1].get("name") if draws else None
    fig.suptitle(title or (f"augmentations of {name}" if name else "augmentations"), fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save `fig` as PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _as_image_list(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """(B,3,H,W) tensor or a sequence of (3,H,W) images (sizes may differ) -> list of (3,H,W)."""
    if isinstance(images, Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim != 4:
            raise ValueError(f"images: expected (B,3,H,W) or (3,H,W), got {tuple(images.shape)}")
        return list(images)
    return list(images)


def _gt_boxes(target: Tensor | dict | None) -> Tensor | None:
    """A target given as boxes (G,4) or a dict with "boxes" (optionally "mask") -> (G,4) or None."""
    if target is None:
        return None
    if isinstance(target, dict):
        boxes = target["boxes"]
        if "mask" in target:
            boxes = boxes[target["mask"]]
        return boxes
    return target


def _hex_colors(n: int) -> list[str]:
    """n distinct colours (tab10, then tab20) as hex strings for draw_bounding_boxes."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [matplotlib.colors.to_hex(cmap(i % cmap.N)) for i in range(n)]


@torch.no_grad()
def plot_feature_maps(
    model: torch.nn.Module,
    image: Tensor,
    title: str | None = None,
    cmap: str = "viridis",
    show_input: bool = True,
    figsize: tuple[float, float] = (12.0, 6.0),
) -> Figure:
    """The six SSD feature maps of one image (channel-mean activation), shapes in the titles.

    model: an ``SSD`` (anything with ``feature_maps(images) -> list[(B,C,h,w)]``).
    image: (3,S,S) or (1,3,S,S) float in [0,1], the network input. With ``show_input`` the
    image itself is the first panel. Each map has its own colour scale (mean over channels).
    The model is run in eval mode; its mode is restored afterwards.
    """
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"plot_feature_maps: one image (3,S,S), got {tuple(image.shape)}")
    param = next(model.parameters(), None)
    if param is not None:
        image = image.to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        maps = model.feature_maps(image)
    finally:
        model.train(was_training)
    panels = len(maps) + int(show_input)
    ncols = math.ceil(panels / 2)
    fig = Figure(figsize=figsize)
    axes = fig.subplots(2, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    flat = list(axes.flat)
    if show_input:
        ax = flat.pop(0)
        ax.imshow(to_uint8(image[0]).permute(1, 2, 0).numpy())
        ax.set_title(f"input {tuple(image.shape[-2:])}", fontsize=9)
    for k, (ax, fmap) in enumerate(zip(flat, maps, strict=False)):
        c, h, w = fmap.shape[1:]
        mean = fmap[0].float().mean(0).cpu()  # (h,w) channel-mean activation
        im = ax.imshow(mean.numpy(), cmap=cmap, interpolation="nearest")
        ax.set_title(f"map {k + 1}: {c}×{h}×{w}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "SSD feature maps (mean over channels)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_predictions(
    images: Tensor | Sequence[Tensor],
    detections: Sequence[dict[str, Tensor]],
    targets: Sequence[Tensor | dict | None] | None = None,
    ncols: int = 4,
    class_names: Sequence[str] = CLASS_NAMES,
    names: Sequence[str] | None = None,
    title: str | None = None,
    width: int = 2,
    panel_size: float = 3.0,
    show_class: bool | None = None,
) -> Figure:
    """Grid of images with predicted boxes (red, "[label] score") and ground truth (green).

    images: (B,3,H,W) or a list of (3,H,W), float [0,1] or uint8 (sizes may differ).
    detections: one ``{"boxes": (K,4), "scores": (K,), "labels": (K,)}`` per image.
    targets: optional, one per image: GT boxes (G,4), a dict with "boxes" (and optionally a
    "mask" (G,) bool), or None where unknown.
    show_class: write the class name before the score; None = only with more than one
    foreground class in ``class_names``. ``panel_size``: inches per grid cell.
    All boxes are xyxy in the pixel frame of the image shown. ``SSD.detect`` returns boxes in
    *original* image pixels: to draw on the network input (S,S) call it without sizes (
    orig_sizes None); to draw on the original photo pass the original image.
    """
    imgs = _as_image_list(images)
    if len(detections) != len(imgs):
        raise ValueError(f"plot_predictions: {len(imgs)} images but {len(detections)} detections")
    if targets is not None and len(targets) != len(imgs):
        raise ValueError(f"plot_predictions: {len(imgs)} images but {len(targets)} targets")
    if show_class is None:
        show_class = len(class_names) > 2
    n = len(imgs)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, img, det) in enumerate(zip(axes.flat, imgs, detections, strict=False)):
        drawn = to_uint8(img)
        gt = _gt_boxes(targets[i]) if targets is not None else None
        if gt is not None and len(gt):
            drawn = draw_bounding_boxes(
                drawn, gt.detach().float().cpu(), colors=GT_COLOR, width=width
            )
        boxes = det["boxes"].detach().float().cpu()
        if len(boxes):
            text = _label_texts(
                {k: v.detach().cpu() for k, v in det.items()}, class_names, show_class
            )
            drawn = draw_bounding_boxes(drawn, boxes, labels=text, colors=PRED_COLOR, width=width)
        ax.imshow(drawn.permute(1, 2, 0).numpy())
        head = f"{names[i]}: " if names is not None else ""
        gt_text = f", {len(gt)} GT" if gt is not None else ""
        ax.set_title(f"{head}{len(boxes)} pred{gt_text}", fontsize=8)
    fig.suptitle(title or "predictions (red) and ground truth (green)", fontsize=10)
    fig.tight_layout()
    return fig


def _anchor_levels(model: torch.nn.Module) -> Tensor | None:
    """(N,) feature-map index of each anchor, from an SSD's feature_sizes/anchors_per_location."""
    sizes = getattr(model, "feature_sizes", None)
    per_loc = getattr(model, "anchors_per_location", None)
    if sizes is None or per_loc is None:
        return None
    counts = torch.tensor([h * w * a for (h, w), a in zip(sizes, per_loc, strict=True)])
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


@torch.no_grad()
def plot_matching(
    model_or_anchors: torch.nn.Module | Tensor,
    image: Tensor,
    gt_boxes: Tensor,
    iou_threshold: float = 0.5,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 6.5),
    anchor_width: int = 1,
    gt_width: int = 3,
) -> Figure:
    """The anchors that become positive for each GT box of one image, drawn over the image.

    model_or_anchors: an ``SSD`` (its ``anchors_xyxy`` buffer; the per-GT legend then also counts
    positives per feature map) or anchors (N,4) xyxy normalized to the input.
    image: (3,H,W) float [0,1] or uint8, usually the (S,S) network input.
    gt_boxes: (G,4) xyxy in pixels of ``image``.
    Matching is ``core.matching.match_anchors`` (IoU >= ``iou_threshold`` plus each GT's forced
    best anchor), exactly as in the loss. Each GT and its positive anchors share a colour.
    """
    if isinstance(model_or_anchors, Tensor):
        anchors, levels = model_or_anchors, None
    else:
        anchors, levels = model_or_anchors.anchors_xyxy, _anchor_levels(model_or_anchors)
    anchors = anchors.detach().float().cpu()  # (N,4) xyxy normalized
    h, w = image.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    gt = gt_boxes.as_subclass(Tensor).detach().float().cpu().reshape(-1, 4)  # (G,4) pixels
    g = len(gt)
    matched = (
        match_anchors(
            (gt / scale)[None], torch.ones(1, g, dtype=torch.bool), anchors, iou_threshold
        )[0]
        if g
        else torch.full((len(anchors),), -1, dtype=torch.int64)
    )  # (N,) GT index or -1
    colors = _hex_colors(max(g, 1))
    drawn = to_uint8(image)
    legend = []
    for k in range(g):  # a handful of GT boxes per image: a loop for drawing is fine
        pos = (matched == k).nonzero().flatten()
        if len(pos):
            drawn = draw_bounding_boxes(
                drawn, (anchors[pos] * scale).clamp_min(0), colors=colors[k], width=anchor_width
            )
        per_map = ""
        if levels is not None and len(pos):
            counts = torch.bincount(levels[pos], minlength=int(levels.max()) + 1).tolist()
            per_map = " (per map: " + ", ".join(str(c) for c in counts) + ")"
        legend.append((colors[k], f"GT {k}: {len(pos)} positive anchors{per_map}"))
    if g:
        drawn = draw_bounding_boxes(drawn, gt, colors=colors[:g], width=gt_width)
    fig = Figure(figsize=figsize)
    ax = fig.subplots()
    ax.imshow(drawn.permute(1, 2, 0).numpy())
    ax.axis("off")
    if legend:
        ax.legend(
            handles=[Patch(color=c, label=t) for c, t in legend],
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            fontsize=7,
            frameon=False,
        )
    n_pos = int((matched >= 0).sum())
    ax.set_title(
        title
        or f"positive anchors (IoU ≥ {iou_threshold} + forced best): {n_pos} of {len(anchors)}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_anchor_shapes(
    gt_wh: Tensor, pairs: Sequence[Sequence[tuple[float, float]]], title: str = ""
) -> Figure:
    """Scatter of box shapes ``gt_wh`` (G,2) (w, h normalized to the image) against the anchor
    shapes of ``pairs`` (per map: (scale, ratio = w/h)), one colour per map."""
    fig = Figure(figsize=(6, 6), dpi=100)
    ax = fig.subplots()
    ax.scatter(gt_wh[:, 0], gt_wh[:, 1], s=8, c="0.6", label="training boxes")
    cmap = matplotlib.colormaps["viridis"].resampled(len(pairs))
    for m, level in enumerate(pairs):
        w = [s * math.sqrt(r) for s, r in level]
        h = [s / math.sqrt(r) for s, r in level]
        ax.scatter(w, h, s=60, marker="x", color=cmap(m), label=f"anchors, map {m}")
    ax.set(
        xlabel="width (fraction of image)",
        ylabel="height (fraction of image)",
        xlim=(0, 1.1),
        ylim=(0, 1.1),
        title=title or "box shapes vs anchor shapes",
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_summary(
    labels: Sequence[str],
    values: Sequence[float | None],
    metric: str,
    notes: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Horizontal bar chart of one metric per sweep job, first on top; a value of None (a failed
    job, a missing metric) is a grey bar labelled with its note."""
    n = len(labels)
    notes = list(notes) if notes is not None else [""] * n
    shown = [v if v is not None else 0.0 for v in values]
    fig = Figure(figsize=(9, 1.0 + 0.45 * max(1, n)))
    ax = fig.subplots()
    y = list(range(n))[::-1]  # first on top
    colors = ["tab:blue" if v is not None else "lightgrey" for v in values]
    bars = ax.barh(y, shown, color=colors)
    for bar, v, note in zip(bars, values, notes, strict=True):
        text = f"{v:.4f}" if v is not None else note
        ax.text(
            bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize=8
        )
    ax.set_yticks(y)
    ax.set_yticklabels([lab if len(lab) <= 70 else lab[:67] + "..." for lab in labels], fontsize=8)
    ax.set_xlabel(metric)
    top = max(shown, default=0.0)
    ax.set_xlim(min(0.0, *shown), (top if top > 0 else 1.0) * 1.25)  # all-zero maps still show
    ax.set_title(title or f"sweep summary: {metric}", fontsize=10)
    fig.tight_layout()
    return fig
