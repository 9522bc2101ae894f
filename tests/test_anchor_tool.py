"""`python -m ssd_lightning.anchors`: the coverage report and the fit mode."""

import shutil

import pytest
import torch
from torchvision.ops import box_convert

from ssd_lightning.config import ConfigError
from ssd_lightning.config.paths import config_dir, load_option
from ssd_lightning.core.anchors import anchor_pairs, generate_anchors
from ssd_lightning.tools import anchors as tool


@pytest.fixture(scope="module")
def train_boxes():
    return tool.training_boxes(tool.compose("train", []))


def test_report_counts_and_coverage(train_boxes):
    rep = tool.report(tool.compose("train", ["anchors=tall_skinny"]), train_boxes)
    assert rep["total"] == 7760
    assert [m["size"] for m in rep["maps"]] == ["38x38", "19x19", "10x10", "5x5", "3x3", "1x1"]
    cov = rep["coverage"]
    assert cov["boxes"] == len(train_boxes) > 250  # the 120 training images' pedestrians
    assert 0 < cov["best_iou_min"] <= cov["best_iou_median"] <= 1
    # the data-driven default covers pedestrians far better than the SSD paper's square anchors
    ssd = tool.report(tool.compose("train", ["anchors=ssd"]), train_boxes)["coverage"]
    assert cov["bpr"] > ssd["bpr"] + 0.1
    text = tool.format_report(rep)
    assert "7760" in text and "best possible recall" in text


def test_report_follows_overrides(train_boxes):
    rep = tool.report(
        tool.compose("train", ["anchors=ssd", "model.net.image_size=512"]), train_boxes
    )
    assert rep["maps"][0]["size"] == "64x64"
    narrowed = tool.report(
        tool.compose(
            "train",
            [
                "anchors.ratios=[0.3]",  # on the default's tall_skinny behind its pairs
                "anchors.extra_square=false",
                "anchors.scales=[0.1,0.2,0.375,0.55,0.725,0.9]",
            ],
        ),
        train_boxes,
    )
    assert narrowed["total"] == 1940


def test_coverage_is_perfect_when_anchors_are_the_boxes():
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.7], [0.5, 0.2, 0.6, 0.5]])
    cov = tool.coverage(gt, gt.clone())
    assert cov["bpr"] == 1 and cov["best_iou_min"] == pytest.approx(1)


def test_kmeans_recovers_two_obvious_shapes():
    wh = torch.cat(
        [torch.tensor([[0.1, 0.4]]).repeat(20, 1), torch.tensor([[0.4, 0.8]]).repeat(20, 1)]
    ) * (1 + 0.01 * torch.rand(40, 2))
    centers = tool.kmeans_shapes(wh, 2)
    centers = centers[centers[:, 0].argsort()]
    torch.testing.assert_close(centers, torch.tensor([[0.1, 0.4], [0.4, 0.8]]), atol=0.01, rtol=0)


def test_fit_writes_a_usable_preset_that_covers_at_least_as_well(
    tmp_path, monkeypatch, train_boxes
):
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    monkeypatch.setenv("SSD_LIGHTNING_CONF_DIR", str(conf))
    out = tmp_path / "shapes.png"
    tool.main(
        [
            "fit",
            "--name",
            "fitted_test",
            "--seeds",
            "2",
            "--figure",
            str(out),
            "anchors=tall_skinny",
        ]
    )
    assert (conf / "anchors" / "fitted_test.yaml").is_file() and out.stat().st_size > 0
    with pytest.raises(ConfigError, match="exists"):
        tool.write_preset({"preset": {"name": "fitted_test"}}, conf)

    cfg = tool.compose("train", ["anchors=fitted_test"])  # usable at once by name
    pairs = anchor_pairs(cfg.anchors)
    assert [len(level) for level in pairs] == [4] * 6
    sizes = tool.feature_sizes(300)

    def bpr(p):
        anchors = box_convert(generate_anchors(sizes, p), "cxcywh", "xyxy")
        return tool.coverage(train_boxes, anchors)["bpr"]

    assert bpr(pairs) >= bpr(anchor_pairs(tool.compose("train", ["anchors=tall_skinny"]).anchors))


def test_fit_keeps_the_presets_clipping(train_boxes):
    cfg = tool.compose("train", ["anchors=tall_skinny", "anchors.clip=false"])
    result = tool.fit(cfg, "unclipped", seeds=1, gt=train_boxes)
    assert result["preset"]["clip"] is False
    anchors = generate_anchors(tool.feature_sizes(300), anchor_pairs(cfg.anchors), clip=False)
    expected = tool.coverage(train_boxes, box_convert(anchors, "cxcywh", "xyxy"))
    assert result["before"] == expected  # scored as the preset it starts from is built


def test_the_default_preset_is_what_fit_writes(train_boxes):
    """conf/anchors/pennfudan_fitted.yaml (the default) is `anchors fit --name pennfudan_fitted
    anchors=tall_skinny` on the committed training split, to the digit: the fit is seeded."""
    result = tool.fit(
        tool.compose("train", ["anchors=tall_skinny"]), "pennfudan_fitted", gt=train_boxes
    )
    assert result["improved"] and result["started_from"] == "tall_skinny"
    committed = load_option("anchors", "pennfudan_fitted")
    assert result["preset"]["pairs"] == committed["pairs"]
    assert result["preset"]["clip"] == committed["clip"]
    assert result["preset"]["fitted_from"] == committed["fitted_from"]


@pytest.mark.parametrize("name", ["../outside", "a b", "", "x/y"])
def test_fit_refuses_a_name_that_is_no_preset_name(tmp_path, monkeypatch, name):
    """--name becomes conf/anchors/<name>.yaml and the option anchors=<name>: a path or a space
    would write elsewhere or a preset no override can select."""
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    monkeypatch.setenv("SSD_LIGHTNING_CONF_DIR", str(conf))
    before = sorted(p.relative_to(conf) for p in conf.rglob("*"))
    with pytest.raises(ConfigError, match="--name"):
        tool.main(["fit", "--name", name, "--seeds", "1", "--figure", str(tmp_path / "f.png")])
    assert sorted(p.relative_to(conf) for p in conf.rglob("*")) == before
    assert not (tmp_path / "f.png").exists()


def test_fit_with_a_figure_it_cannot_write_writes_no_preset(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    monkeypatch.setenv("SSD_LIGHTNING_CONF_DIR", str(conf))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--figure .*cannot create its folder"):
        tool.main(["fit", "--name", "f2", "--seeds", "1", "--figure", str(blocker / "f.png")])
    assert not (conf / "anchors" / "f2.yaml").exists()
