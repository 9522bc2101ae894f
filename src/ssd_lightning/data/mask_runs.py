"""Instance masks as row runs that move with the image (``MaskRuns``), and what stays visible of
each instance after the augmentation (``visible_boxes``).

A crop that cuts a pedestrian leaves the box clipped to the crop, which can be mostly background;
the instance mask knows what is still in view. Moving (G, H, W) masks through every crop, flip
and resize costs G·H·W per step (and a box read off a nearest-neighbour resized mask is only good
to a pixel of the network input). Instead each mask is stored as its row runs: one-pixel-tall
rectangles [x0, x1) x [y, y + 1), each given by two corners that the v2 geometric transforms move
like key points - a few hundred points per instance. Clipped to the final canvas, the runs give
each instance's visible mask area and the box around it: for crops, flips, padding and resizes
exactly the box ``masks_to_boxes`` finds on the transformed mask (continuous pixel edges, see
dataset.py), computed with the same float arithmetic the transforms apply to the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F


class MaskRuns(tv_tensors.KeyPoints):
    """(G, R, 2, 2) float32 row runs of G instance masks: instance, run (zero-padded to the
    instance with the most runs; a padding run has zero area and keeps it), corner (top-left,
    bottom-right), (x, y) in the continuous pixel edges of ``canvas_size``; every run lies in the
    canvas (a crop clips them, as it clamps boxes). ``area`` (G,) is each whole mask's area in
    the canvas's pixels, the parts a crop cut off included (it scales with a resize)."""

    area: Tensor

    def copy(self) -> MaskRuns:
        """A copy that shares nothing with this one (tensor ops would return plain KeyPoints)."""
        return _runs(_plain(self).clone(), self.canvas_size, self.area.clone())


def _runs(points: Tensor, canvas_size: tuple[int, int], area: Tensor) -> MaskRuns:
    runs = points.as_subclass(MaskRuns)  # what KeyPoints' own wrapping does, without the checks
    runs.canvas_size = (int(canvas_size[0]), int(canvas_size[1]))
    runs.area = area
    return runs


def _plain(runs: MaskRuns) -> Tensor:
    return runs.as_subclass(Tensor)


def _clip(points: Tensor, canvas_size: tuple[int, int]) -> Tensor:
    """Corners clamped into the canvas, as a crop clamps the boxes: what a crop cuts off is gone
    (a later padding must not bring it back); a run wholly outside gets zero area."""
    limit = torch.tensor([float(canvas_size[1]), float(canvas_size[0])])
    return points.clamp(min=0).minimum(limit)


# Kernels of their own: the result stays a MaskRuns with its area whatever the torchvision
# version, and flips mirror pixel *edges* as they do for boxes (x -> W - x); key points mirror
# pixel indices (x -> W - 1 - x), which would shift every flipped run by a pixel.
@F.register_kernel(F.horizontal_flip, MaskRuns)
def _hflip(runs: MaskRuns) -> MaskRuns:
    x, y = _plain(runs).unbind(-1)  # (G, R, 2) each
    x = runs.canvas_size[1] - x.flip(-1)  # mirrored; the corners swap to stay top-left first
    return _runs(torch.stack([x, y], -1), runs.canvas_size, runs.area)


@F.register_kernel(F.vertical_flip, MaskRuns)
def _vflip(runs: MaskRuns) -> MaskRuns:
    x, y = _plain(runs).unbind(-1)
    y = runs.canvas_size[0] - y.flip(-1)
    return _runs(torch.stack([x, y], -1), runs.canvas_size, runs.area)


@F.register_kernel(F.crop, MaskRuns)
def _crop(runs: MaskRuns, top: int, left: int, height: int, width: int) -> MaskRuns:
    points, canvas = F.crop_keypoints(_plain(runs), top, left, height, width)
    return _runs(_clip(points, canvas), canvas, runs.area)


@F.register_kernel(F.center_crop, MaskRuns)
def _center_crop(runs: MaskRuns, output_size: Any) -> MaskRuns:
    points, canvas = F.center_crop_keypoints(_plain(runs), runs.canvas_size, output_size)
    return _runs(_clip(points, canvas), canvas, runs.area)


@F.register_kernel(F.resize, MaskRuns)
def _resize(
    runs: MaskRuns, size: Any, *args: Any, max_size: int | None = None, **kwargs: Any
) -> MaskRuns:
    h, w = runs.canvas_size
    points, (nh, nw) = F.resize_keypoints(_plain(runs), size, (h, w), max_size=max_size)
    return _runs(points, (nh, nw), runs.area * ((nh / h) * (nw / w)))


@F.register_kernel(F.resized_crop, MaskRuns)
def _resized_crop(
    runs: MaskRuns, top: int, left: int, height: int, width: int, size: Any, **kwargs: Any
) -> MaskRuns:
    return _resize(_crop(runs, top, left, height, width), size)


@F.register_kernel(F.pad, MaskRuns)
def _pad(
    runs: MaskRuns, padding: Any, fill: Any = None, padding_mode: str = "constant"
) -> MaskRuns:
    points, canvas = F.pad_keypoints(_plain(runs), runs.canvas_size, padding, padding_mode)
    return _runs(points, canvas, runs.area)


def _not_followed(name: str) -> Callable[..., MaskRuns]:
    def kernel(runs: MaskRuns, *args: Any, **kwargs: Any) -> MaskRuns:
        raise NotImplementedError(
            f"augmentation.tight_boxes: the instance masks follow crops, flips, resizes and "
            f"padding, not {name}; set augmentation.tight_boxes=null to keep the boxes {name} "
            "gives"
        )

    return kernel


for _fn in (F.affine, F.rotate, F.perspective, F.elastic):
    F.register_kernel(_fn, MaskRuns)(_not_followed(_fn.__name__))


def mask_runs(masks: Tensor) -> MaskRuns:
    """(G, H, W) bool instance masks -> their ``MaskRuns`` on the (H, W) canvas. (An instance
    without a mask can be given its box, filled: it then keeps the box the geometry gives.)"""
    g, h, w = masks.shape
    edges = torch.nn.functional.pad(masks.to(torch.int8), (1, 1)).diff(dim=-1)  # (G, H, W+1)
    inst, y, x0 = (edges == 1).nonzero(as_tuple=True)  # run starts, in row-major order
    x1 = (edges == -1).nonzero(as_tuple=True)[2]  # run ends, in the same order
    count = torch.bincount(inst, minlength=g)  # (G,) runs per instance
    slot = torch.arange(len(inst)) - (count.cumsum(0) - count)[inst]
    runs = torch.zeros(g, max(int(count.max()) if g else 0, 1), 2, 2)
    corners = torch.stack([torch.stack([x0, y], -1), torch.stack([x1, y + 1], -1)], 1)
    runs[inst, slot] = corners.float()  # (R, 2 corners, xy)
    return _runs(runs, (h, w), masks.sum((1, 2)).float())


def visible_boxes(runs: MaskRuns) -> tuple[Tensor, Tensor]:
    """``boxes`` (G, 4) xyxy around each instance's visible runs (all zero where nothing is
    visible) and ``area`` (G,), the visible mask area, both in the canvas's pixels."""
    p = _plain(runs)  # (G, R, 2 corners, xy), inside the canvas
    lo, hi = p[:, :, 0], p[:, :, 1]  # (G, R, xy)
    run_area = (hi - lo).prod(-1)  # (G, R)
    seen = (run_area > 0).unsqueeze(-1)
    first = torch.where(seen, lo, math.inf).amin(1)  # (G, xy)
    last = torch.where(seen, hi, -math.inf).amax(1)
    boxes = torch.cat([first, last], -1)
    area = run_area.sum(1)
    return torch.where((area > 0)[:, None], boxes, 0.0), area
