"""Anchor presets and tensors."""

import math

import pytest
import torch
from torchvision.ops import box_convert

from ssd_lightning.config.paths import available_options, load_option
from ssd_lightning.core.anchors import (
    anchor_pairs,
    compact_base,
    fitted_override_note,
    generate_anchors,
)
from ssd_lightning.core.ssd import SSD

SIZES_300 = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


@pytest.mark.parametrize("preset", ["tall_skinny", "ssd"])
def test_design_presets_give_7760_anchors_at_300(preset):
    pairs = anchor_pairs(load_option("anchors", preset))
    assert [len(level) for level in pairs] == [4] * 6
    assert generate_anchors(SIZES_300, pairs).shape == (7760, 4)


def test_presets_are_there_and_tall_skinny_is_tall():
    assert {"tall_skinny", "ssd", "dense_tall"} <= set(available_options("anchors"))
    ratios = [r for level in anchor_pairs(load_option("anchors", "tall_skinny")) for _, r in level]
    assert all(r <= 1 for r in ratios)


def test_model_map_shapes_and_anchor_buffers_at_300():
    model = SSD(load_option("anchors", "tall_skinny"), weights="none")
    assert model.feature_sizes == SIZES_300
    assert model.num_anchors == 7760
    buffers = dict(model.named_buffers())
    assert "anchors_cxcywh" in buffers and "anchors_xyxy" in buffers
    maps = model.feature_maps(torch.rand(2, 3, 300, 300))
    assert [tuple(m.shape) for m in maps] == [(2, 256, h, w) for h, w in SIZES_300]


def test_other_input_size_needs_no_code_change():
    model = SSD(load_option("anchors", "ssd"), weights="none", image_size=512)
    assert model.feature_sizes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    loc, logits = model(torch.rand(1, 3, 512, 512))
    assert loc.shape == (1, model.num_anchors, 4) and logits.shape == (1, model.num_anchors, 2)


def test_center_and_corner_forms_agree():
    model = SSD(load_option("anchors", "dense_tall"), weights="none", image_size=160)
    back = box_convert(model.anchors_xyxy, "xyxy", "cxcywh")
    torch.testing.assert_close(back, model.anchors_cxcywh, atol=1e-6, rtol=0)
    assert model.anchors_xyxy.min() >= 0 and model.anchors_xyxy.max() <= 1


def test_anchor_geometry_matches_the_definition():
    pairs = [[(0.2, 0.25), (0.3, 1.0)]]
    a = generate_anchors([(2, 3)], pairs, clip=False)  # (2*3*2, 4), order (i, j, a)
    assert a.shape == (12, 4)
    # row 1, column 2, anchor 0: center ((2 + .5) / 3, (1 + .5) / 2), w = s*sqrt(r), h = s/sqrt(r)
    torch.testing.assert_close(a[(1 * 3 + 2) * 2 + 0], torch.tensor([2.5 / 3, 0.75, 0.1, 0.4]))
    torch.testing.assert_close(a[1], torch.tensor([0.5 / 3, 0.25, 0.3, 0.3]))


def test_anchors_move_with_the_module():
    model = SSD(load_option("anchors", "ssd"), weights="none", image_size=128).to(torch.float64)
    assert model.anchors_cxcywh.dtype == torch.float64


def test_explicit_pairs_and_per_map_ratios():
    pairs = anchor_pairs({"pairs": [[[0.1, 1], [0.1, 0.5]]] * 6})
    assert pairs[0] == [(0.1, 1.0), (0.1, 0.5)]
    per_map = anchor_pairs({"scales": [0.1] * 7, "ratios": [[1.0]] * 3 + [[1.0, 0.5]] * 3})
    assert [len(level) for level in per_map] == [2, 2, 2, 3, 3, 3]
    assert math.isclose(per_map[0][-1][0], 0.1)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"scales": [0.1] * 7, "ratios": [1.0, -0.5]}, "anchors.ratios"),
        ({"scales": [0.1] * 7, "ratios": [1.0, 0]}, "anchors.ratios"),
        ({"scales": [0.1, 0.0] + [0.2] * 5, "ratios": [1.0]}, "anchors.scales"),
        ({"ratios": [1.0]}, "give either `pairs`"),
        ({"scales": [0.1] * 7, "ratios": [[1.0]] * 2}, "per-map lists for 6 maps"),
    ],
)
def test_bad_presets_are_rejected_with_the_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        anchor_pairs(cfg)


def test_wrong_number_of_maps_names_both_counts():
    with pytest.raises(ValueError, match="describes 5 feature maps but the backbone makes 6"):
        SSD({"scales": [0.1] * 6, "ratios": [1.0]}, weights="none")


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: .*tall_skinny"):
        load_option("anchors", "no_such_preset")


def test_scales_or_ratios_on_a_fitted_preset_build_on_the_preset_behind_it():
    """The default preset lists fitted (scale, ratio) pairs: a scales / ratios / extra_square
    override builds on the preset they were fitted from (`fitted_from`), as it would on that
    preset; a pairs preset without one refuses them, naming a preset to start from."""
    preset = dict(load_option("anchors", "pennfudan_fitted"))
    base = dict(load_option("anchors", preset["fitted_from"]["name"]))
    assert {k: base[k] for k in preset["fitted_from"]} == dict(preset["fitted_from"])
    assert anchor_pairs(preset) == [[tuple(p) for p in level] for level in preset["pairs"]]
    for override in ({"ratios": [0.5]}, {"scales": [0.2] * 7}, {"extra_square": False}):
        assert anchor_pairs({**preset, **override}) == anchor_pairs({**base, **override})
    with pytest.raises(ValueError, match="anchors.ratios: every value must be"):
        anchor_pairs({**preset, "ratios": [-1.0]})
    # what builds the anchors, and the run's log line saying so
    assert compact_base({**preset, "ratios": [0.5]}) == {**preset["fitted_from"], "ratios": [0.5]}
    assert compact_base(preset) == dict(preset["fitted_from"])
    assert fitted_override_note(preset) is None
    note = fitted_override_note({**preset, "ratios": [0.5]})
    assert note.startswith("anchors.ratios given: preset pennfudan_fitted's fitted pairs")
    bare = {k: v for k, v in preset.items() if k != "fitted_from"}
    assert compact_base(bare) is None
    with pytest.raises(ValueError, match="anchors.ratios .*explicit `pairs`.*anchors=tall_skinny"):
        anchor_pairs({**bare, "ratios": [0.5]})
