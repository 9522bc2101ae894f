"""Tight boxes from the instance masks: MaskRuns against torchvision's own masks_to_boxes on
v2-transformed masks, TightBoxes' rules, and the boxes of the real training pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import PENNFUDAN
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ssd_lightning.config.paths import load_option
from ssd_lightning.data.dataset import PennFudanDataset, _instance_masks
from ssd_lightning.data.mask_runs import MaskRuns, mask_runs, visible_boxes
from ssd_lightning.data.presets import build_fallbacks, build_train_transform, needs_masks
from ssd_lightning.data.transforms import TightBoxes

pytestmark = pytest.mark.usefixtures("one_thread")
S = 300


def boxes_of(masks: Tensor) -> Tensor:
    """masks_to_boxes in the project's convention: exclusive x2/y2, all zero for an empty mask."""
    b = masks_to_boxes(masks)
    b[:, 2:] += 1
    return torch.where(masks.flatten(1).any(1)[:, None], b, 0.0)


@st.composite
def instance_masks(draw) -> Tensor:
    g, h, w = draw(st.integers(0, 4)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.floats(0.0, 1.0))
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(g, h, w, generator=gen) < density


@settings(max_examples=100, deadline=None)
@given(masks=instance_masks())
def test_runs_hold_the_masks(masks):
    runs = mask_runs(masks)
    boxes, area = visible_boxes(runs)
    assert runs.canvas_size == tuple(masks.shape[1:]) and runs.shape[2:] == (2, 2)
    torch.testing.assert_close(boxes, boxes_of(masks), rtol=0, atol=0)
    torch.testing.assert_close(area, masks.sum((1, 2)).float(), rtol=0, atol=0)
    torch.testing.assert_close(runs.area, area, rtol=0, atol=0)


# every geometric step the presets use on the pixel grid, with masks as their reference
_STEPS = {
    "crop": lambda: v2.RandomCrop((17, 23), pad_if_needed=True),
    "hflip": lambda: v2.RandomHorizontalFlip(1.0),
    "vflip": lambda: v2.RandomVerticalFlip(1.0),
    "pad": lambda: v2.Pad([3, 1, 0, 5]),
    "zoom_out": lambda: v2.RandomZoomOut(side_range=(1.0, 2.0), p=1.0),
}


@settings(max_examples=150, deadline=None)
@given(
    masks=instance_masks(),
    steps=st.lists(st.sampled_from(sorted(_STEPS)), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_runs_follow_crops_flips_and_padding_as_the_masks_do(masks, steps, seed):
    """Differential: the visible boxes and areas of the moved runs equal masks_to_boxes and the
    pixel count of the same masks moved by the same v2 calls (padding after a crop included:
    what the crop cut off stays gone)."""
    pipe = v2.Compose([_STEPS[s]() for s in steps])
    torch.manual_seed(seed)
    out_masks, out_runs = pipe(tv_tensors.Mask(masks), mask_runs(masks))
    assert isinstance(out_runs, MaskRuns) and out_runs.canvas_size == out_masks.shape[1:]
    boxes, area = visible_boxes(out_runs)
    torch.testing.assert_close(boxes, boxes_of(out_masks), rtol=0, atol=0)
    torch.testing.assert_close(area, out_masks.sum((1, 2)).float(), rtol=0, atol=0)
    torch.testing.assert_close(out_runs.area, masks.sum((1, 2)).float(), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(masks=instance_masks(), size=st.tuples(st.integers(1, 90), st.integers(1, 90)))
def test_a_resize_scales_the_runs_as_it_scales_boxes(masks, size):
    runs = mask_runs(masks)
    boxes = tv_tensors.BoundingBoxes(boxes_of(masks), format="XYXY", canvas_size=runs.canvas_size)
    resized_boxes, resized_runs = v2.Resize(size)(boxes, runs)
    got, area = visible_boxes(resized_runs)
    seen = masks.flatten(1).any(1)
    torch.testing.assert_close(got[seen], resized_boxes[seen].as_subclass(Tensor))  # same floats
    h, w = masks.shape[1:]
    scale = size[0] * size[1] / (h * w)
    torch.testing.assert_close(area, masks.sum((1, 2)).float() * scale)
    torch.testing.assert_close(resized_runs.area, area)


def test_runs_refuse_the_geometry_they_do_not_follow():
    runs = mask_runs(torch.ones(1, 10, 10, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="augmentation.tight_boxes=null"):
        v2.RandomRotation(10)(runs)


# -- TightBoxes ----------------------------------------------------------------------------------
def _target(masks: Tensor, boxes: Tensor | None = None) -> dict:
    h, w = masks.shape[1:]
    boxes = boxes_of(masks) if boxes is None else boxes
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(1, len(masks) + 1),
        "mask_runs": mask_runs(masks),
    }


def test_a_cut_pedestrian_is_boxed_where_it_is_seen():
    """FudanPed00067: a crop leaving 12 px of the person's right side keeps the clipped box
    [0, 78, 12, 375] (93% background); the visible mask is a foot, [0, 326, 12, 369]."""
    ds = PennFudanDataset(PENNFUDAN, ["FudanPed00067.png"], with_masks=True)
    image, target = ds.raw(0)
    crop = (0, 172, 416, 281)  # top, left, height, width
    image = F.crop(image, *crop)
    target = {**target, "boxes": F.crop(target["boxes"], *crop)}
    target["mask_runs"] = F.crop(target["mask_runs"], *crop)
    assert target["boxes"].tolist() == [[0.0, 78.0, 12.0, 375.0]]
    _, masks = _instance_masks(ds.mask_path("FudanPed00067.png"))
    expected = boxes_of(F.crop(tv_tensors.Mask(masks), *crop))
    assert expected.tolist() == [[0.0, 326.0, 12.0, 369.0]]
    _, kept = TightBoxes(S, min_visible=0.0, min_pixels=0.0)(image, dict(target))
    assert torch.equal(kept["boxes"].as_subclass(Tensor), expected)
    assert "mask_runs" not in kept and kept["boxes"].canvas_size == (416, 281)
    # 2% of the person is left: the default preset drops it
    thresholds = load_option("augmentation", "safe_crop")["tight_boxes"]
    _, dropped = TightBoxes(S, **thresholds)(image, dict(target))
    assert dropped["boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_tight_boxes_thresholds_and_earlier_drops():
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 2:10, 2:10] = True  # 64 px
    masks[1, 12:14, 12:14] = True  # 4 px
    masks[2, 0:20, 15:20] = True  # 100 px, but its box was dropped by an earlier step
    boxes = boxes_of(masks)
    boxes[2] = 0
    image = torch.zeros(3, 20, 20)
    _, out = TightBoxes(20, min_pixels=5)(image, _target(masks, boxes))
    assert out["boxes"].tolist() == [[2.0, 2.0, 10.0, 10.0], [0.0] * 4, [0.0] * 4]
    _, out = TightBoxes(20, min_pixels=4)(image, _target(masks, boxes))
    assert out["boxes"].tolist()[1] == [12.0, 12.0, 14.0, 14.0]
    # min_pixels counts at the network input: 4 px of a 20 px canvas are 16 px at 40 px
    _, out = TightBoxes(40, min_pixels=16)(image, _target(masks, boxes))
    assert out["boxes"].tolist()[1] == [12.0, 12.0, 14.0, 14.0]
    _, out = TightBoxes(40, min_pixels=17)(image, _target(masks, boxes))
    assert out["boxes"].tolist()[1] == [0.0] * 4
    # min_visible: the share of the whole mask still in view; the crop leaves 16 of 64 px
    whole = _target(masks, boxes)
    cut = {k: F.crop(whole[k], 0, 0, 20, 4) for k in ("boxes", "mask_runs")}
    _, out = TightBoxes(20, min_visible=0.25)(image, dict(cut))
    assert out["boxes"].tolist()[0] == [2.0, 2.0, 4.0, 10.0]
    _, out = TightBoxes(20, min_visible=0.26)(image, dict(cut))
    assert out["boxes"].tolist()[0] == [0.0] * 4


def test_samples_without_masks_keep_their_boxes():
    target = {
        "boxes": tv_tensors.BoundingBoxes([[1.0, 2, 30, 40]], format="XYXY", canvas_size=(50, 50)),
        "labels": torch.tensor([1]),
    }
    image = torch.zeros(3, 50, 50)
    out_image, out = TightBoxes()(image, target)
    assert out_image is image and out is target


def test_tight_boxes_errors_name_the_key_and_the_cause():
    with pytest.raises(ValueError, match=r"augmentation.tight_boxes.min_visible=1.5.*\[0, 1\]"):
        TightBoxes(min_visible=1.5)
    with pytest.raises(ValueError, match=r"augmentation.tight_boxes.min_pixels=-1"):
        TightBoxes(min_pixels=-1)
    target = _target(torch.ones(2, 5, 5, dtype=torch.bool))
    target["boxes"] = target["boxes"][:1]
    with pytest.raises(ValueError, match="SanitizeBoundingBoxes after TightBoxes"):
        TightBoxes()(torch.zeros(3, 5, 5), target)


# -- the real training pipeline ------------------------------------------------------------------
class WithFullMasks(PennFudanDataset):
    """Also carries the full (G, H, W) masks through the pipeline, to measure against."""

    def raw(self, index):
        image, target = super().raw(index)
        _, masks = _instance_masks(self.mask_path(self.names[index]))
        target["masks"] = tv_tensors.Mask(masks)
        target["whole"] = masks.sum((1, 2))  # a plain tensor: the transforms leave it alone
        return image, target


class Record:
    """A pipeline step that keeps a copy of every target passing it."""

    def __init__(self) -> None:
        self.targets: list[dict] = []

    def __call__(self, image, target):
        self.targets.append(dict(target))
        return image, target


@pytest.mark.parametrize("preset", ["safe_crop", "iou_crop"])
def test_training_boxes_hug_the_visible_masks(preset):
    """On the real images through the shipped pipelines: right after TightBoxes every kept box is
    exactly masks_to_boxes of its cropped mask, with enough of the mask in view (not checked
    after RandomResizedCrop, which resamples the reference masks too); at the end no box is
    mostly background (before: 1.3% of the boxes were under 10% mask, the worst 0%)."""
    aug = load_option("augmentation", preset)
    assert needs_masks(aug)
    pipeline = build_train_transform(aug, S)
    after_tight = Record()
    steps = [type(t).__name__ for t in pipeline.transforms]
    pipeline.transforms.insert(steps.index("TightBoxes") + 1, after_tight)
    ds = WithFullMasks(
        PENNFUDAN,
        sorted(p.name for p in (PENNFUDAN / "PNGImages").glob("*.png"))[::3],
        transforms=pipeline,
        fallbacks=build_fallbacks(aug, S),
        skip_empty=True,
        with_masks=True,
    )
    centres = torch.arange(S) + 0.5
    torch.manual_seed(0)
    worst_cover, n = 1.0, 0
    for _ in range(3):
        for i in range(len(ds)):
            _, t = ds[i]
            assert "mask_runs" not in t and len(t["boxes"]) == len(t["masks"]) >= 1
            got = t["boxes"].as_subclass(Tensor)  # (G, 4) network-input pixels
            inside_x = (centres >= got[:, 0:1]) & (centres < got[:, 2:3])  # (G, S)
            inside_y = (centres >= got[:, 1:2]) & (centres < got[:, 3:4])
            inside = inside_y[:, :, None] & inside_x[:, None, :]  # (G, S, S)
            cover = (t["masks"] & inside).sum((1, 2)) / inside.sum((1, 2)).clamp(min=1)
            worst_cover = min(worst_cover, float(cover.min()))
            n += len(got)
    assert n > 150 and worst_cover > 0.2
    thresholds = aug["tight_boxes"]
    dropped = exact = 0
    for t in after_tight.targets:
        boxes, masks = t["boxes"].as_subclass(Tensor), t["masks"]
        kept = (boxes[:, 2:] > boxes[:, :2]).all(1)
        dropped += int((~kept & (masks.sum((1, 2)) > 0)).sum())
        h, w = masks.shape[1:]
        if (h, w) == (S, S):  # RandomResizedCrop's: the reference masks were resampled too
            continue
        exact += 1
        torch.testing.assert_close(boxes[kept], boxes_of(masks[kept]), rtol=0, atol=0)
        shown = masks[kept].sum((1, 2))  # what was kept had enough of its mask in view
        assert (shown >= thresholds["min_visible"] * t["whole"][kept]).all()
        assert (shown * S * S / (h * w) >= thresholds["min_pixels"]).all()
    assert len(after_tight.targets) > 100 and exact > 50 and dropped > 0
