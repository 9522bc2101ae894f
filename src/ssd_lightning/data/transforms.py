"""The project's own augmentation transforms (torchvision.transforms.v2 ``Transform``s and
pipeline stages); ``presets`` puts them into pipelines.

- ``SafeBoxCenteredCrop``: an object-centric crop that always keeps a chosen box
- ``BoundedRandomIoUCrop``: torchvision's RandomIoUCrop with its retry loop bounded
- ``TightBoxes``: boxes recomputed from the instance masks after the crop, slivers dropped
- ``ResizeKeepLargest``: the last empty-box fallback stage (resize-only, largest box kept)

Boxes are XYXY in pixels of the image they travel with (continuous pixel edges, see dataset.py).
Randomness comes from torch's global generator, so ``torch.manual_seed`` reproduces a draw.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import get_bounding_boxes, query_size

from ssd_lightning.core.plain import is_number
from ssd_lightning.data.mask_runs import visible_boxes

ASPECT_OF = ("image", "box")  # what SafeBoxCenteredCrop's aspect bounds are relative to


class SafeBoxCenteredCrop(v2.Transform):
    """Object-centric crop that keeps a chosen GT box (the original design's replacement for
    RandomIoUCrop, which spins or yields background-only crops on small, tall pedestrians).

    Per attempt: pick a target box with weight ∝ area**area_power, and a crop aspect
    c = a·r (width / height), a drawn log-uniformly in ``aspect`` and r the image's aspect
    (``aspect_of="image"``: the crop has about the image's proportions, so after the square resize
    objects keep the proportions they have in uncropped images, up to a) or the target box's
    (``"box"``: the crop follows the target's shape; tall pedestrians then need a of 2-4 not to
    come out square). The crop is s times the smallest crop of aspect c that holds the target,
    s ~ U(context) but no larger than fits in the image - so a tall target is zoomed vertically
    as well, where a crop clipped to the image height would always be full height - rounded and
    clipped to the image; its position is uniform among those containing the target (or, for
    s < 1, inside it). Accept if crop area / image area ∈ [min_area_frac, max_area_frac],
    (crop w/h) / r ∈ aspect, both sides ≥ min_crop_size and target visibility ≥ min_visibility.
    Other boxes stay if their visibility (share inside the crop) ≥ keep_visibility; dropped boxes
    are set to all-zero, so a later ``SanitizeBoundingBoxes`` removes them with their labels and
    masks. All ``max_tries`` attempts are drawn in one batch and the first valid one is used (same
    result as trying them in turn, bounded time); ``make_params`` reports it as ``tries``. No valid
    attempt (or no boxes) -> the input is returned unchanged. Boxes are clipped to the crop.
    """

    def __init__(
        self,
        area_power: float = 1.0,
        context: tuple[float, float] = (1.2, 3.0),
        min_area_frac: float = 0.1,
        max_area_frac: float = 1.0,
        aspect: tuple[float, float] = (0.5, 2.0),
        aspect_of: str = "image",
        min_visibility: float = 0.9,
        keep_visibility: float = 0.5,
        max_tries: int = 50,
        min_crop_size: int = 8,
    ) -> None:
        super().__init__()
        key = "augmentation.crop.safe_box"
        if not (0 < context[0] <= context[1]):
            raise ValueError(f"{key}.context={list(context)}: allowed values are 0 < low <= high")
        if not (0 <= min_area_frac <= max_area_frac):
            raise ValueError(
                f"{key}.min_area_frac={min_area_frac}, max_area_frac={max_area_frac}: allowed "
                "values are 0 <= min_area_frac <= max_area_frac"
            )
        if not (0 < aspect[0] <= aspect[1]):
            raise ValueError(f"{key}.aspect={list(aspect)}: allowed values are 0 < low <= high")
        if aspect_of not in ASPECT_OF:
            raise ValueError(f"{key}.aspect_of={aspect_of!r}: allowed values are {ASPECT_OF}")
        if max_tries < 1:
            raise ValueError(f"{key}.max_tries={max_tries}: allowed values are integers >= 1")
        self.area_power = float(area_power)
        self.context = (float(context[0]), float(context[1]))
        self.min_area_frac, self.max_area_frac = float(min_area_frac), float(max_area_frac)
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.aspect_of = aspect_of
        self.min_visibility, self.keep_visibility = float(min_visibility), float(keep_visibility)
        self.max_tries, self.min_crop_size = int(max_tries), int(min_crop_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        try:
            bboxes = get_bounding_boxes(flat_inputs)
        except ValueError:  # an image without boxes: nothing to centre on
            return {"accepted": False, "tries": 0}
        boxes = F.convert_bounding_box_format(
            bboxes.as_subclass(Tensor), bboxes.format, tv_tensors.BoundingBoxFormat.XYXY
        ).float()  # (G,4) xyxy pixels
        g, t = len(boxes), self.max_tries
        if g == 0 or min(h, w) < self.min_crop_size:
            return {"accepted": False, "tries": 0}
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        area = bw * bh  # (G,)
        weights = area.pow(self.area_power) if area.sum() > 0 else torch.ones(g)
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            weights = torch.ones(g)
        idx = torch.multinomial(weights, t, replacement=True)  # (T,) target per attempt
        u = torch.rand(t, 4)  # context, x position, y position, aspect
        tb = boxes[idx]  # (T,4)
        tw, th = bw[idx].clamp(min=1), bh[idx].clamp(min=1)  # target size, >= 1 px for sizing
        ref = torch.full((t,), w / h) if self.aspect_of == "image" else tw / th  # (T,)
        lo, hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        c = ref * torch.exp(lo + (hi - lo) * u[:, 3])  # (T,) crop width / height
        h0 = torch.maximum(th, tw / c)  # the smallest crop of aspect c holding the target
        s_max = torch.minimum(h / h0, w / (c * h0)).clamp(*self.context)  # largest s that fits
        s = self.context[0] + (s_max - self.context[0]) * u[:, 0]
        ch = (s * h0).round().clamp(1, h)
        cw = (s * c * h0).round().clamp(1, w)

        def position(b1: Tensor, b2: Tensor, size: Tensor, limit: int, r: Tensor):
            # crop start so the crop contains the target (or lies inside it when smaller)
            lo = torch.minimum(b1, b2 - size).clamp(min=0).ceil()
            hi = torch.minimum(torch.maximum(b1, b2 - size), limit - size).floor()
            start = (lo + (r * (hi - lo + 1)).floor()).clamp(max=hi)
            return start, hi >= lo

        left, okx = position(tb[:, 0], tb[:, 2], cw, w, u[:, 1])
        top, oky = position(tb[:, 1], tb[:, 3], ch, h, u[:, 2])
        crops = torch.stack([left, top, left + cw, top + ch], dim=1)  # (T,4) xyxy
        iw = (
            torch.minimum(crops[:, None, 2], boxes[None, :, 2])
            - torch.maximum(crops[:, None, 0], boxes[None, :, 0])
        ).clamp(min=0)
        ih = (
            torch.minimum(crops[:, None, 3], boxes[None, :, 3])
            - torch.maximum(crops[:, None, 1], boxes[None, :, 1])
        ).clamp(min=0)
        vis = (iw * ih) / area.clamp(min=1e-12)  # (T,G) share of each box inside each crop
        vis = torch.where(area > 0, vis, torch.zeros_like(vis))
        frac = cw * ch / (h * w)
        ar = cw / ch / ref  # relative to the image's or the target's aspect
        valid = (
            okx
            & oky
            & (frac >= self.min_area_frac)
            & (frac <= self.max_area_frac)
            & (ar >= self.aspect[0])
            & (ar <= self.aspect[1])
            & (cw >= self.min_crop_size)
            & (ch >= self.min_crop_size)
            & (vis.gather(1, idx[:, None])[:, 0] >= self.min_visibility)
        )
        if not bool(valid.any()):
            return {"accepted": False, "tries": t}
        k = int(valid.int().argmax())
        keep = vis[k] >= self.keep_visibility
        keep[idx[k]] = True
        return {
            "accepted": True,
            "tries": k + 1,
            "target": int(idx[k]),
            "keep": keep,
            "top": int(top[k]),
            "left": int(left[k]),
            "height": int(ch[k]),
            "width": int(cw[k]),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["accepted"]:
            return inpt
        box = (params["top"], params["left"], params["height"], params["width"])
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            out = F.crop(inpt, *box)  # translated and clamped to the crop
            return tv_tensors.wrap(out.masked_fill(~params["keep"][:, None], 0), like=out)
        return self._call_kernel(F.crop, inpt, *box)


class BoundedRandomIoUCrop(v2.RandomIoUCrop):
    """torchvision's RandomIoUCrop with its outer `while True` bounded by `max_rounds` (after
    which: no crop), so it cannot spin on small, tall pedestrians; for the `iou_crop` preset. The
    sampling is the parent's, round for round."""

    def __init__(self, *args: Any, max_rounds: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_rounds = int(max_rounds)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        orig_h, orig_w = query_size(flat_inputs)
        bboxes = get_bounding_boxes(flat_inputs)
        xyxy = F.convert_bounding_box_format(
            bboxes.as_subclass(Tensor), bboxes.format, tv_tensors.BoundingBoxFormat.XYXY
        )
        cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
        for _ in range(self.max_rounds):
            min_iou = self.options[int(torch.randint(0, len(self.options), (1,)))]
            if min_iou >= 1.0:
                return {}
            for _ in range(self.trials):
                r = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(2)
                new_w, new_h = int(orig_w * r[0]), int(orig_h * r[1])
                if (
                    new_h == 0
                    or not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio
                ):
                    continue
                r = torch.rand(2)
                left, top = int((orig_w - new_w) * r[0]), int((orig_h - new_h) * r[1])
                right, bottom = left + new_w, top + new_h
                if left == right or top == bottom:
                    continue
                within = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                if not within.any():
                    continue
                crop = torch.tensor([[left, top, right, bottom]], dtype=xyxy.dtype)
                if box_iou(xyxy[within], crop).max() < min_iou:
                    continue
                return {
                    "top": top,
                    "left": left,
                    "height": new_h,
                    "width": new_w,
                    "is_within_crop_area": within,
                }
        return {}


class TightBoxes:
    """Pipeline stage right after the crop step: each box becomes the box around what is still
    visible of its instance mask (``target["mask_runs"]``, moved by the steps before this one),
    so a pedestrian a crop cuts is boxed where it is seen, not across the background its clipped
    box spans; the flips and the resize after it move the tight boxes exactly. An instance is
    dropped (box zeroed, ``SanitizeBoundingBoxes`` removes it with its label) when less than
    ``min_visible`` of its mask stays in view, when less than ``min_pixels`` of mask area would
    reach the network input (the canvas resized to ``image_size`` x ``image_size``), or when an
    earlier step dropped its box. The runs leave the target here; a sample without them (boxes
    only) passes unchanged."""

    def __init__(
        self, image_size: int = 300, min_visible: float = 0.0, min_pixels: float = 1.0
    ) -> None:
        checks = (
            ("min_visible", min_visible, 1.0, "a number in [0, 1]"),
            ("min_pixels", min_pixels, math.inf, "a number >= 0"),
        )
        for key, value, top, allowed in checks:
            if not (is_number(value, finite=False) and 0 <= value <= top):
                raise ValueError(
                    f"augmentation.tight_boxes.{key}={value!r}: allowed values are {allowed}"
                )
        self.image_size = int(image_size)
        self.min_visible, self.min_pixels = float(min_visible), float(min_pixels)

    def __repr__(self) -> str:
        return (
            f"TightBoxes(image_size={self.image_size}, min_visible={self.min_visible}, "
            f"min_pixels={self.min_pixels})"
        )

    def __call__(self, image: Any, target: dict) -> tuple[Any, dict]:
        runs = target.get("mask_runs")
        if runs is None:
            return image, target
        boxes = target["boxes"]  # BoundingBoxes (G, 4) XYXY, the project's format
        old = boxes.as_subclass(Tensor)  # plain tensors: no per-op tv_tensor dispatch
        if runs.as_subclass(Tensor).shape[0] != old.shape[0]:
            raise ValueError(
                f"TightBoxes: instance masks for {runs.shape[0]} boxes, not {old.shape[0]}; a "
                "step before it removed boxes without their masks (put SanitizeBoundingBoxes "
                "after TightBoxes)"
            )
        tight, area = visible_boxes(runs)  # (G, 4) xyxy, (G,) in canvas pixels
        h, w = runs.canvas_size
        keep = (
            (old[:, 2:] > old[:, :2]).all(1)  # not dropped by an earlier step
            & (area > 0)
            & (area >= self.min_visible * runs.area)
            & (area >= self.min_pixels * (h * w) / self.image_size**2)  # in canvas pixels
        )
        new = {k: v for k, v in target.items() if k != "mask_runs"}
        new["boxes"] = tv_tensors.wrap(torch.where(keep[:, None], tight, 0.0), like=boxes)
        return image, new


class ResizeKeepLargest:
    """Fallback stage 2: the resize-only path keeping only the largest original box, widened to
    at least 1 px after the resize so the sample is never empty. Output as the train pipeline."""

    def __init__(self, image_size: int, antialias: bool = True) -> None:
        self.size = (int(image_size), int(image_size))
        self.antialias = antialias

    def __call__(self, image: tv_tensors.Image, target: dict) -> tuple[tv_tensors.Image, dict]:
        boxes = target["boxes"]
        xyxy = F.convert_bounding_box_format(boxes.as_subclass(Tensor), boxes.format, "XYXY")
        k = int(((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])).argmax())
        out = F.resize(
            tv_tensors.BoundingBoxes(
                xyxy[k : k + 1].float(), format="XYXY", canvas_size=boxes.canvas_size
            ),
            list(self.size),
        )
        b = out.as_subclass(Tensor).clone()
        s = float(self.size[0])
        for lo, hi in ((0, 2), (1, 3)):  # widen sub-pixel boxes to 1 px, inside [0, S]
            c = ((b[:, lo] + b[:, hi]) / 2).clamp(0.5, s - 0.5)
            small = (b[:, hi] - b[:, lo]) < 1
            b[:, lo] = torch.where(small, c - 0.5, b[:, lo])
            b[:, hi] = torch.where(small, c + 0.5, b[:, hi])
        # the whole largest box is kept, so it is already tight: the mask runs are not needed
        drop = ("boxes", "labels", "masks", "mask_runs")
        new = {k2: v for k2, v in target.items() if k2 not in drop}
        new["boxes"] = tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=self.size)
        new["labels"] = target["labels"][k : k + 1]
        if "masks" in target:
            new["masks"] = F.resize(target["masks"][k : k + 1], list(self.size))
        img = F.resize(image, list(self.size), antialias=self.antialias)
        return F.to_dtype(img, torch.float32, scale=True), new
