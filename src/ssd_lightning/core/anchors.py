"""Anchor (default box) presets and their tensors.

A preset (a mapping, e.g. ``conf/anchors/<name>.yaml`` as the config layer loads it) describes,
per feature map, a list of (scale, ratio) pairs:
``scale`` is the anchor's size relative to the image side and ``ratio = w / h``, so an anchor is
``w = scale * sqrt(ratio)``, ``h = scale / sqrt(ratio)`` wide and tall, normalized to the image.
A preset is written either compactly::

    scales: [s_1, ..., s_M, s_M+1]   # one per map, plus one more for the last map's extra square
    ratios: [1.0, 0.5, 0.33]         # shared by all maps, or one list per map
    extra_square: true               # add the SSD paper's (sqrt(s_k * s_k+1), 1) anchor

or explicitly, as the anchor fitter writes it::

    pairs: [[[s, r], [s, r], ...], ...]   # one list per map
    fitted_from: {name: ..., scales: [...], ratios: [...], extra_square: ...}

``fitted_from`` (optional) is the compact preset the pairs were fitted from: a ``scales``,
``ratios`` or ``extra_square`` given to an explicit preset (a command-line override of the
default) builds on it, the pairs giving way, so that ``anchors.ratios=[0.5]`` means the same with
every preset that has scales and ratios behind it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

AnchorPairs = list[list[tuple[float, float]]]

# the keys of a compact preset; given to an explicit one, they build on its fitted_from
COMPACT_KEYS = ("scales", "ratios", "extra_square")


def _check_positive(values: Sequence[float], key: str) -> None:
    for v in values:
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"{key}: every value must be a finite number > 0, got {v!r}")


def _compact_overrides(cfg: Mapping) -> list[str]:
    """The compact keys given to an explicit (pairs) preset."""
    if cfg.get("pairs") is None:
        return []
    return [k for k in COMPACT_KEYS if cfg.get(k) is not None]


def compact_base(cfg: Mapping) -> dict | None:
    """The scales + ratios preset behind ``cfg``: itself, or for an explicit preset its
    ``fitted_from`` with the compact keys given to it (None: explicit pairs alone)."""
    if cfg.get("pairs") is None:
        merged = dict(cfg)
    elif cfg.get("fitted_from") is not None:
        merged = {**cfg["fitted_from"], **{k: cfg[k] for k in _compact_overrides(cfg)}}
    else:
        return None
    return {k: merged[k] for k in ("name", *COMPACT_KEYS) if merged.get(k) is not None}


def fitted_override_note(cfg: Mapping) -> str | None:
    """A sentence for the run's log where compact keys given to a fitted preset replace its pairs
    (None where they do not): the preset's name alone would hide it."""
    compact, base = _compact_overrides(cfg), cfg.get("fitted_from")
    if not compact or base is None:
        return None
    return (
        f"anchors.{' and anchors.'.join(compact)} given: preset {cfg.get('name', '?')}'s fitted "
        f"pairs give way to the scales + ratios of {base.get('name', '?')}, the preset they were "
        "fitted from"
    )


def anchor_pairs(cfg: Mapping) -> AnchorPairs:
    """Expand an anchor preset into per-map (scale, ratio) pairs, validating it on the way."""
    name = cfg.get("name", "?")
    if cfg.get("pairs") is not None:
        compact = _compact_overrides(cfg)
        if compact and cfg.get("fitted_from") is None:
            raise ValueError(
                f"anchors.{compact[0]} (preset {name}): this preset lists explicit `pairs`, so "
                "scales and ratios do not apply; start from a scales + ratios preset instead, "
                "e.g. anchors=tall_skinny anchors.ratios=[0.5,0.33]"
            )
        if compact:
            return anchor_pairs(compact_base(cfg))
        pairs = [[(float(s), float(r)) for s, r in level] for level in cfg["pairs"]]
        for m, level in enumerate(pairs):
            if not level:
                raise ValueError(
                    f"anchors.pairs[{m}] (preset {name}): a map needs at least one pair"
                )
            _check_positive([v for pair in level for v in pair], f"anchors.pairs[{m}]")
        return pairs
    if cfg.get("scales") is None or cfg.get("ratios") is None:
        raise ValueError(
            f"anchors (preset {name}): give either `pairs` or both `scales` and `ratios`"
        )
    scales = [float(s) for s in cfg["scales"]]
    _check_positive(scales, "anchors.scales")
    extra = bool(cfg.get("extra_square", True))
    num_maps = len(scales) - 1 if extra else len(scales)
    if num_maps < 1:
        raise ValueError(f"anchors.scales: need at least {2 if extra else 1} values, got {scales}")
    ratios = list(cfg["ratios"])
    if ratios and isinstance(ratios[0], Sequence):  # one list per map
        if len(ratios) != num_maps:
            raise ValueError(
                f"anchors.ratios: {len(ratios)} per-map lists for {num_maps} maps "
                f"(scales has {len(scales)} values, extra_square={extra})"
            )
        per_map = [[float(r) for r in rs] for rs in ratios]
    else:
        per_map = [[float(r) for r in ratios]] * num_maps
    pairs: AnchorPairs = []
    for m in range(num_maps):
        _check_positive(per_map[m], "anchors.ratios")
        level = [(scales[m], r) for r in per_map[m]]
        if extra:
            level.append((math.sqrt(scales[m] * scales[m + 1]), 1.0))
        if not level:
            raise ValueError(f"anchors.ratios: map {m} has no anchors")
        pairs.append(level)
    return pairs


def generate_anchors(
    feature_sizes: Sequence[tuple[int, int]], pairs: AnchorPairs, clip: bool = True
) -> Tensor:
    """Anchors for all maps, ``(N, 4)`` cxcywh normalized to [0, 1].

    Order: map, row i, column j, anchor a — the order the heads flatten their outputs in.
    Centers sit at ((j + 0.5) / W, (i + 0.5) / H). With ``clip`` the corners are clipped to the
    image and the center form recomputed, so both forms describe the same box.
    """
    if len(pairs) != len(feature_sizes):
        raise ValueError(
            f"anchors: the preset describes {len(pairs)} feature maps but the backbone makes "
            f"{len(feature_sizes)} (sizes {list(feature_sizes)}); give one entry per map"
        )
    out = []
    for (h, w), level in zip(feature_sizes, pairs, strict=True):
        sr = torch.tensor(level, dtype=torch.float64)  # (A, 2) scale, ratio
        wh = torch.stack([sr[:, 0] * sr[:, 1].sqrt(), sr[:, 0] / sr[:, 1].sqrt()], -1)  # (A, 2)
        cy = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        cx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
        cyy, cxx = torch.meshgrid(cy, cx, indexing="ij")  # (h, w)
        centers = torch.stack([cxx, cyy], -1)[:, :, None, :].expand(h, w, len(level), 2)
        sizes = wh[None, None].expand(h, w, len(level), 2)
        out.append(torch.cat([centers, sizes], -1).reshape(-1, 4))
    anchors = torch.cat(out)
    if clip:
        xyxy = box_convert(anchors, "cxcywh", "xyxy").clamp(0.0, 1.0)
        anchors = box_convert(xyxy, "xyxy", "cxcywh")
    return anchors.float()
