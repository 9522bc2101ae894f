"""v2 augmentation pipelines, SafeBoxCenteredCrop guarantees and the empty-box fallback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PENNFUDAN
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssd_lightning.data.dataset import DetectionDataset, PennFudanDataset
from ssd_lightning.data.presets import (
    build_eval_transform,
    build_fallbacks,
    build_train_transform,
    needs_masks,
)
from ssd_lightning.data.transforms import (
    ASPECT_OF,
    BoundedRandomIoUCrop,
    ResizeKeepLargest,
    SafeBoxCenteredCrop,
)

S = 300
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "augmentation"


pytestmark = pytest.mark.usefixtures("one_thread")


def preset(name: str) -> dict:
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


def train_ds(aug: dict | None = None) -> PennFudanDataset:
    aug = preset("safe_crop") if aug is None else aug
    return PennFudanDataset(
        PENNFUDAN,
        transforms=build_train_transform(aug, S),
        fallbacks=build_fallbacks(aug, S),
        skip_empty=True,
        with_masks=needs_masks(aug),
    )


class SyntheticDataset(DetectionDataset):
    """In-memory samples through the real __getitem__ (pipeline + fallback)."""

    def __init__(self, samples, transforms, fallbacks):
        super().__init__(transforms, fallbacks)
        self.samples = samples
        self.names = [f"synthetic{i}.png" for i in range(len(samples))]

    def raw(self, index):
        img, boxes = self.samples[index]
        h, w = img.shape[-2:]
        return tv_tensors.Image(img), {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.arange(1, len(boxes) + 1),
        }


def check_train_sample(img: Tensor, t: dict) -> None:
    assert img.shape == (3, S, S) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    b = t["boxes"].as_subclass(Tensor)
    assert b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == 4
    assert len(b) >= 1, f"{t['name']}: empty training sample"
    assert len(t["labels"]) == len(b) and t["labels"].dtype == torch.int64
    assert (b >= 0).all() and (b <= S).all()
    assert ((b[:, 2:] - b[:, :2]) >= 1 - 1e-4).all()
    assert tuple(t["boxes"].canvas_size) == (S, S)


# -- presets -------------------------------------------------------------------------------------
def test_safe_crop_pipeline_order():
    aug = dict(preset("safe_crop"), photometric_after_resize=False)
    names = [type(t).__name__ for t in build_train_transform(aug, S).transforms]
    assert names == [
        "ToImage",
        "RandomPhotometricDistort",
        "RandomChoice",
        "TightBoxes",
        "RandomHorizontalFlip",
        "Resize",
        "SanitizeBoundingBoxes",
        "ToDtype",
    ]
    choice = build_train_transform(aug, S).transforms[2]
    assert [type(t).__name__ for t in choice.transforms] == [
        "SafeBoxCenteredCrop",
        "RandomResizedCrop",
        "Identity",
    ]
    assert choice.p == pytest.approx([0.5, 0.3, 0.2])
    fast = [type(t).__name__ for t in build_train_transform(preset("safe_crop"), S).transforms]
    assert fast.index("RandomPhotometricDistort") == fast.index("Resize") + 1
    assert "RandomChoice" not in [
        type(t).__name__ for t in build_fallbacks(preset("safe_crop"), S)[0].transforms
    ]
    assert [type(t).__name__ for t in build_eval_transform(S).transforms] == [
        "ToImage",
        "Resize",
        "ToDtype",
    ]


@pytest.mark.parametrize("name", ["safe_crop", "light", "none", "iou_crop"])
def test_every_preset_keeps_the_guarantees(name):
    ds = train_ds(preset(name))
    torch.manual_seed(1)
    for i in range(0, len(ds), 2):
        img, t = ds[i]
        check_train_sample(img, t)


def test_unknown_crop_type_names_the_key():
    with pytest.raises(ValueError, match="augmentation.crop.type"):
        build_train_transform({"crop": {"type": "bogus"}}, S)


# -- thousands of draws over the real images -----------------------------------------------------
def test_thousands_of_seeded_draws_keep_a_box():
    ds = train_ds()
    ds.preload()
    torch.manual_seed(0)
    stages = [0, 0, 0]
    draws = 0
    for _ in range(13):  # 13 x 170 = 2210 draws
        for i in range(len(ds)):
            img, t = ds[i]
            check_train_sample(img, t)
            assert (t["labels"] == 1).all()
            stages[t["fallback"]] += 1
            draws += 1
    assert draws > 2000 and len(ds) == 170
    assert stages[0] > 0.95 * draws  # the fallback is rare on real data


def test_seeded_draws_reproduce():
    ds = train_ds()
    out = []
    for _ in range(2):
        torch.manual_seed(7)
        out.append([ds[i] for i in range(5)])
    for (a, ta), (b, tb) in zip(*out, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ta["boxes"].as_subclass(Tensor), tb["boxes"].as_subclass(Tensor))


# -- SafeBoxCenteredCrop invariants --------------------------------------------------------------
def visibility(boxes: Tensor, crop: Tensor) -> Tensor:
    iw = (torch.minimum(boxes[:, 2], crop[2]) - torch.maximum(boxes[:, 0], crop[0])).clamp(min=0)
    ih = (torch.minimum(boxes[:, 3], crop[3]) - torch.maximum(boxes[:, 1], crop[1])).clamp(min=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return torch.where(area > 0, iw * ih / area.clamp(min=1e-12), torch.zeros_like(area))


def check_crop(t: SafeBoxCenteredCrop, img: Tensor, boxes: Tensor) -> dict:
    h, w = img.shape[-2:]
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    state = torch.get_rng_state()
    p = t.make_params([tv_tensors.Image(img), bb])
    assert 0 <= p["tries"] <= t.max_tries
    if not p["accepted"]:
        torch.set_rng_state(state)
        out_img, out_b = t(tv_tensors.Image(img), bb)
        assert out_img.shape == img.shape and torch.equal(out_b, bb)  # unchanged
        return p
    x, y, cw, ch = p["left"], p["top"], p["width"], p["height"]
    assert x >= 0 and y >= 0 and x + cw <= w and y + ch <= h  # inside the image
    assert t.min_area_frac - 1e-6 <= cw * ch / (h * w) <= t.max_area_frac + 1e-6
    target = boxes[p["target"]].float()
    size = (target[2:] - target[:2]).clamp(min=1)  # the target's (w, h), >= 1 px for its aspect
    ref = w / h if t.aspect_of == "image" else float(size[0] / size[1])
    assert t.aspect[0] * (1 - 1e-5) <= cw / ch / ref <= t.aspect[1] * (1 + 1e-5)
    assert min(cw, ch) >= t.min_crop_size
    vis = visibility(boxes.float(), torch.tensor([x, y, x + cw, y + ch], dtype=torch.float32))
    assert vis[p["target"]] >= t.min_visibility - 1e-6
    expect = vis >= t.keep_visibility
    expect[p["target"]] = True
    assert torch.equal(p["keep"], expect)
    # apply with the same draw: image cropped, kept boxes clipped to the crop, dropped zeroed
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    out_img, out_b = t(tv_tensors.Image(img), bb)
    assert torch.equal(torch.get_rng_state(), after)
    assert out_img.shape[-2:] == (ch, cw) and tuple(out_b.canvas_size) == (ch, cw)
    ob = out_b.as_subclass(Tensor)
    assert (ob[~p["keep"]] == 0).all()
    kept = ob[p["keep"]]
    assert (kept >= 0).all() and (kept[:, [0, 2]] <= cw).all() and (kept[:, [1, 3]] <= ch).all()
    return p


def test_crop_invariants_on_real_images():
    """The shipped crop on every image, 12 draws each: the guarantees hold, a crop is found at
    once, and the crops zoom vertically (the crop used to keep the tall target's shape, and the
    aspect bound forced 97.5% of the crops to the full image height)."""
    ds = PennFudanDataset(PENNFUDAN)
    crop = SafeBoxCenteredCrop(**preset("safe_crop")["crop"]["safe_box"])
    torch.manual_seed(3)
    accepted = tries = calls = 0
    heights = []  # crop height / image height of the accepted crops
    for i in range(len(ds)):
        img, tgt = ds.raw(i)
        boxes = tgt["boxes"].as_subclass(Tensor)
        for _ in range(12):
            torch.manual_seed(1000 * i + _)
            p = check_crop(crop, img.as_subclass(Tensor), boxes)
            calls += 1
            accepted += p["accepted"]
            tries += p["tries"]
            if p["accepted"]:
                heights.append(p["height"] / img.shape[-2])
    assert calls == 2040 and accepted > 0.9 * calls
    assert tries / calls < 10  # usually found in a few attempts
    heights = torch.tensor(heights)
    assert (heights > 0.999).float().mean() < 0.1
    assert heights.quantile(0.25) < 0.85 and heights.median() < 0.95


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 400),
    w=st.integers(1, 400),
    raw=st.lists(st.tuples(*[st.floats(0, 1)] * 4), min_size=1, max_size=30),
    context=st.tuples(st.floats(0.3, 2.0), st.floats(0.0, 3.0)),
    min_area=st.floats(0, 0.8),
    aspect_lo=st.floats(0.2, 1.0),
    aspect_of=st.sampled_from(ASPECT_OF),
    min_vis=st.floats(0.1, 1.0),
    keep_vis=st.floats(0.0, 1.0),
    max_tries=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_crop_invariants_property(
    h, w, raw, context, min_area, aspect_lo, aspect_of, min_vis, keep_vis, max_tries, seed
):
    r = torch.tensor(raw)
    x = torch.sort(r[:, [0, 2]] * w, dim=1).values
    y = torch.sort(r[:, [1, 3]] * h, dim=1).values
    boxes = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
    crop = SafeBoxCenteredCrop(
        context=(context[0], context[0] + context[1]),
        min_area_frac=min_area,
        aspect=(aspect_lo, 1 / aspect_lo),
        aspect_of=aspect_of,
        min_visibility=min_vis,
        keep_visibility=keep_vis,
        max_tries=max_tries,
        min_crop_size=1,
    )
    torch.manual_seed(seed)
    check_crop(crop, torch.zeros(3, h, w, dtype=torch.uint8), boxes)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(100, 600),
    w_over_h=st.floats(0.7, 2.0),
    box_h=st.floats(0.3, 0.8),  # share of the image height
    box_aspect=st.floats(0.2, 0.5),  # tall: width / height
    where=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    shape=st.sampled_from([("image", (0.5, 2.0)), ("box", (2.0, 4.0))]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tall_targets_are_zoomed_vertically(h, w_over_h, box_h, box_aspect, where, shape, seed):
    """On a tall pedestrian (w/h <= 0.5, at most 80% of the image height) crops are found and are
    not all of the image's full height."""
    w = round(h * w_over_h)
    bh, bw = box_h * h, min(box_h * h * box_aspect, w)
    x, y = where[0] * (w - bw), where[1] * (h - bh)
    boxes = torch.tensor([[x, y, x + bw, y + bh]])
    kwargs = preset("safe_crop")["crop"]["safe_box"]
    crop = SafeBoxCenteredCrop(**{**kwargs, "aspect_of": shape[0], "aspect": shape[1]})
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    heights = []
    for k in range(20):
        torch.manual_seed(seed + k)
        p = check_crop(crop, img, boxes)
        if p["accepted"]:
            heights.append(p["height"] / h)
    if shape[0] == "box":  # a crop of 2-4x the box's aspect may not fit a narrow photo at all
        assume(heights)
    assert heights and min(heights) < 0.95


def test_crop_options_are_checked_with_their_key():
    with pytest.raises(ValueError, match=r"augmentation.crop.safe_box.aspect_of='tall'"):
        SafeBoxCenteredCrop(aspect_of="tall")
    with pytest.raises(ValueError, match=r"augmentation.crop.safe_box.context=\[2.0, 1.0\]"):
        SafeBoxCenteredCrop(context=(2.0, 1.0))


@pytest.mark.parametrize(
    "case",
    [
        "edge",
        "one_pixel",
        "whole_image",
        "smaller_than_any_crop",
        "many_overlapping",
        "tiny_in_huge",
    ],
)
def test_adversarial_samples_finish_and_keep_guarantees(case):
    g = torch.Generator().manual_seed(0)
    if case == "edge":
        img, boxes = (
            torch.zeros(3, 200, 300),
            torch.tensor([[0.0, 0, 40, 200], [260, 50, 300, 120]]),
        )
    elif case == "one_pixel":
        img, boxes = torch.zeros(3, 240, 320), torch.tensor([[100.0, 100, 101, 101]])
    elif case == "whole_image":
        img, boxes = torch.zeros(3, 180, 250), torch.tensor([[0.0, 0, 250, 180]])
    elif case == "smaller_than_any_crop":
        img, boxes = torch.zeros(3, 5, 6), torch.tensor([[1.0, 1, 4, 4]])
    elif case == "many_overlapping":
        xy = torch.rand(300, 2, generator=g) * 100 + 50
        img, boxes = (
            torch.zeros(3, 300, 300),
            torch.cat([xy, xy + 40 + 10 * torch.rand(300, 2, generator=g)], 1),
        )
    else:
        img, boxes = torch.zeros(3, 2000, 2000), torch.tensor([[1500.0, 1500, 1501, 1501]])
    img = (img * 255).to(torch.uint8)
    crop = SafeBoxCenteredCrop(**preset("safe_crop")["crop"]["safe_box"])
    torch.manual_seed(0)
    for _ in range(50):
        check_crop(crop, img, boxes)
    for name in ["safe_crop", "iou_crop"]:
        aug = preset(name)
        ds = SyntheticDataset(
            [(img, boxes)], build_train_transform(aug, S), build_fallbacks(aug, S)
        )
        t0 = time.monotonic()
        for _ in range(10 if case == "tiny_in_huge" else 30):
            out, t = ds[0]
            check_train_sample(out, t)
        assert time.monotonic() - t0 < 20  # bounded, not a timing benchmark


def test_image_smaller_than_any_crop_is_left_unchanged_without_attempts():
    crop = SafeBoxCenteredCrop(min_crop_size=8)
    bb = tv_tensors.BoundingBoxes([[1.0, 1, 4, 4]], format="XYXY", canvas_size=(5, 6))
    assert crop.make_params([tv_tensors.Image(torch.zeros(3, 5, 6)), bb]) == {
        "accepted": False,
        "tries": 0,
    }


def test_labels_and_masks_follow_kept_boxes_through_sanitize():
    img = tv_tensors.Image(torch.zeros(3, 200, 300, dtype=torch.uint8))
    boxes = torch.tensor(
        [[10.0, 10, 60, 150], [200, 20, 260, 190], [55, 40, 120, 180], [100, 0, 300, 60]]
    )
    masks = torch.zeros(4, 200, 300, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = True
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(200, 300)),
        "labels": torch.tensor([11, 12, 13, 14]),
        "masks": tv_tensors.Mask(masks),
    }
    crop = SafeBoxCenteredCrop(
        area_power=0.0,
        context=(1.0, 1.8),
        min_area_frac=0.05,
        aspect=(0.25, 4.0),
        keep_visibility=0.6,
    )
    pipe = v2.Compose([crop, v2.SanitizeBoundingBoxes()])
    seen_drop = False
    for seed in range(40):
        torch.manual_seed(seed)
        p = crop.make_params([img, target["boxes"]])
        torch.manual_seed(seed)
        _, out = pipe(img, target)
        keep = p["keep"] if p["accepted"] else torch.ones(4, dtype=torch.bool)
        assert p["accepted"]
        seen_drop |= not bool(keep.all())
        assert out["labels"].tolist() == target["labels"][keep].tolist()
        assert len(out["masks"]) == len(out["boxes"]) == int(keep.sum())
    assert seen_drop


def test_bounded_iou_crop_gives_up_instead_of_spinning():
    # 2 px pedestrian, only strict IoU options: torchvision's RandomIoUCrop would loop forever
    crop = BoundedRandomIoUCrop(
        min_scale=0.6, sampler_options=[0.5, 0.7, 0.9], trials=40, max_rounds=5
    )
    img = tv_tensors.Image(torch.zeros(3, 400, 400, dtype=torch.uint8))
    bb = tv_tensors.BoundingBoxes([[10.0, 10, 12, 14]], format="XYXY", canvas_size=(400, 400))
    torch.manual_seed(0)
    assert crop.make_params([img, bb]) == {}
    out_img, out_b = crop(img, bb)
    assert out_img.shape == img.shape and torch.equal(out_b, bb)


# -- empty-box fallback, both stages deterministic -----------------------------------------------
class DropAllBoxes(v2.Transform):
    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            return tv_tensors.wrap(torch.zeros_like(inpt), like=inpt)
        return inpt


def test_fallback_stage_1_reruns_without_the_crop():
    img = (torch.rand(3, 240, 320) * 255).to(torch.uint8)
    boxes = torch.tensor([[20.0, 30, 80, 200], [150, 40, 260, 230]])
    aug = preset("safe_crop")
    emptying = v2.Compose([DropAllBoxes(), *build_train_transform(aug, S).transforms[1:]])
    ds = SyntheticDataset([(img, boxes)], emptying, build_fallbacks(aug, S))
    for seed in range(5):
        torch.manual_seed(seed)
        out, t = ds[0]
        assert t["fallback"] == 1
        check_train_sample(out, t)
        assert len(t["boxes"]) == 2


def test_fallback_stage_2_keeps_the_largest_box():
    # a 1 px and a 3 px box in a 3000 px image: after any crop/resize both are < 1 px, so the
    # pipeline and its no-crop re-run are both empty, whatever the draw
    img = torch.zeros(3, 3000, 3000, dtype=torch.uint8)
    boxes = torch.tensor([[100.0, 100, 101, 101], [2000, 1000, 2003, 1003]])
    ds = SyntheticDataset(
        [(img, boxes)],
        build_train_transform(preset("safe_crop"), S),
        build_fallbacks(preset("safe_crop"), S),
    )
    for seed in range(5):
        torch.manual_seed(seed)
        out, t = ds[0]
        assert t["fallback"] == 2
        check_train_sample(out, t)
        assert t["labels"].tolist() == [2]  # the largest box (SyntheticDataset labels = 1..G)
        c = t["boxes"].as_subclass(Tensor)[0]
        assert torch.allclose((c[:2] + c[2:]) / 2, torch.tensor([200.15, 100.15]), atol=0.01)


def test_resize_keep_largest_widens_sub_pixel_boxes_inside_the_image():
    img = tv_tensors.Image(torch.zeros(3, 1000, 1000, dtype=torch.uint8))
    t = {
        "boxes": tv_tensors.BoundingBoxes(
            [[999.0, 0, 1000, 1]], format="XYXY", canvas_size=(1000, 1000)
        ),
        "labels": torch.tensor([1]),
    }
    out, nt = ResizeKeepLargest(S)(img, t)
    assert out.dtype == torch.float32 and out.shape == (3, S, S)
    assert nt["boxes"].tolist() == [[299.0, 0.0, 300.0, 1.0]]
