"""Augmentation presets (conf/augmentation/*.yaml, plain dicts) -> torchvision.transforms.v2
pipelines.

Every pipeline maps ``(Image uint8 (3,H,W), {"boxes": BoundingBoxes XYXY in input pixels,
"labels": (G,) int64[, "mask_runs"]})`` to ``(Image float32 (3,S,S) in [0,1], target)`` with
boxes XYXY in network-input pixels [0,S]. Crops and photometric work run on uint8; the conversion
to float is the last step. A preset of ``None`` means no augmentation (resize only). A preset
with ``tight_boxes`` recomputes the boxes from the instance masks (``needs_masks``: the dataset
must then supply them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from ssd_lightning.core.plain import to_plain
from ssd_lightning.data.transforms import (
    BoundedRandomIoUCrop,
    ResizeKeepLargest,
    SafeBoxCenteredCrop,
    TightBoxes,
)


def _plain(cfg: Mapping | None) -> dict[str, Any]:
    return {} if cfg is None else to_plain(cfg)


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _kwargs(d: Mapping | None) -> dict[str, Any]:
    return {k: _tuple(v) for k, v in (d or {}).items()}


_CROP_TYPES = ("safe_choice", "iou_crop")


def build_crop(crop: Mapping, image_size: int = 300) -> list[v2.Transform]:
    """The crop step(s) of a preset (`crop` section of an augmentation config). RandomResizedCrop
    outputs (S,S) directly, so the following Resize is a no-op for it."""
    kind = crop.get("type", "safe_choice")
    if kind == "safe_choice":
        return [
            v2.RandomChoice(
                [
                    SafeBoxCenteredCrop(**_kwargs(crop.get("safe_box"))),
                    v2.RandomResizedCrop(
                        size=(image_size, image_size), **_kwargs(crop.get("resized_crop"))
                    ),
                    v2.Identity(),
                ],
                p=list(crop.get("choice_p", [0.5, 0.3, 0.2])),
            )
        ]
    if kind == "iou_crop":
        steps: list[v2.Transform] = []
        if crop.get("zoom_out"):
            steps.append(v2.RandomZoomOut(**_kwargs(crop["zoom_out"])))
        steps.append(BoundedRandomIoUCrop(**_kwargs(crop.get("iou_crop"))))
        return steps
    raise ValueError(f"augmentation.crop.type must be one of {_CROP_TYPES}, got {kind!r}")


def needs_masks(cfg: Mapping | None) -> bool:
    """Whether the preset's pipeline recomputes boxes from instance masks (``tight_boxes``)."""
    return bool(_plain(cfg).get("tight_boxes"))


def build_train_transform(
    cfg: Mapping | None, image_size: int = 300, with_crop: bool = True
) -> v2.Compose:
    """ToImage → PhotometricDistort → crop step → TightBoxes → HorizontalFlip → Resize(S,S) →
    Sanitize → ToDtype (PhotometricDistort right after Resize if `photometric_after_resize`, see
    the preset; TightBoxes if `tight_boxes`).

    Sections that are null/0 in `cfg` are left out; `with_crop=False` is fallback stage 1.
    """
    c = _plain(cfg)
    steps: list[Any] = [v2.ToImage()]
    photometric = []
    if c.get("photometric"):
        photometric = [v2.RandomPhotometricDistort(**_kwargs(c["photometric"]))]
    after = bool(c.get("photometric_after_resize", False))
    if not after:
        steps += photometric
    if with_crop and c.get("crop"):
        steps += build_crop(c["crop"], image_size)
    if c.get("tight_boxes"):  # after the one step that cuts; flips and resizes move boxes exactly
        steps.append(TightBoxes(image_size, **_kwargs(c["tight_boxes"])))
    if c.get("hflip_p", 0):
        steps.append(v2.RandomHorizontalFlip(p=float(c["hflip_p"])))
    steps.append(v2.Resize((image_size, image_size), antialias=c.get("antialias", True)))
    if after:
        steps += photometric
    steps.append(v2.SanitizeBoundingBoxes(**_kwargs(c.get("sanitize"))))  # labels travel along
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def build_eval_transform(image_size: int = 300, antialias: bool = True) -> v2.Compose:
    """Validation / prediction: ToImage → Resize(S,S) → ToDtype (no sanitize: GT kept as is)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=antialias),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def build_fallbacks(cfg: Mapping | None, image_size: int = 300) -> list:
    """Empty-box fallback stages: [pipeline without the crop step, resize-only keeping the largest
    box]; empty if the preset disables `fallback`."""
    c = _plain(cfg)
    if not c.get("fallback", True):
        return []
    return [
        build_train_transform(c, image_size, with_crop=False),
        ResizeKeepLargest(image_size, antialias=c.get("antialias", True)),
    ]
