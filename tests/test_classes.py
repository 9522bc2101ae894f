"""A model's classes against a dataset's (training.classes): matched by name, so evaluate scores
and a resumed run trains each box as the model's class of its name, whatever label the data's
export gives it."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from conftest import PENNFUDAN, make_cfg, run_cli, tiny
from hypothesis import given
from hypothesis import strategies as st

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.paths import load_option
from ssd_lightning.core.ssd import SSD
from ssd_lightning.data.class_match import match_classes
from ssd_lightning.evaluate import evaluate
from ssd_lightning.train import train
from ssd_lightning.training.checkpoint import export_model, load_model
from ssd_lightning.training.classes import model_labels
from ssd_lightning.training.lit_module import SSDLitModule

IMAGES = PENNFUDAN / "PNGImages"
COUNTS = {"a": 1, "b": 2, "c": 3}  # boxes of each class: which name a label means shows


def _bg(*names: str) -> list[str]:
    return ["background", *names]


@pytest.mark.parametrize(
    ("model", "data", "labels"),
    [
        ("abc", "abc", None),  # the same: nothing to do
        ("abc", "cab", [0, 3, 1, 2]),  # another export of the same classes: by name
        ("xabc", "cab", [0, 4, 2, 3]),  # the model has a class more (a placeholder it trained)
        ("abc", "abx", None),  # a renamed class: by label (warned)
        ("abc", "bax", [0, 2, 1, 3]),  # both at once
    ],
)
def test_model_labels_match_by_name(model, data, labels, caplog):
    with caplog.at_level(logging.INFO, logger="ssd_lightning.training.classes"):
        assert model_labels(_bg(*model), _bg(*data), "ckpt_path=m.pt") == labels
    if labels:
        assert "ckpt_path=m.pt: the data's classes matched to the model's by name" in caplog.text
    if "x" in data:
        both = f"model's classes (a, b, c) and the data's ({', '.join(data)}) differ in name"
        assert both in caplog.text and "matched by label: x as c" in caplog.text


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("abc", "acx", "share c at other labels"),  # c would be scored as b
        ("ab", "abc", "the model has 2 class(es) but the data has 3"),
    ],
)
def test_model_labels_refuse_what_neither_name_nor_label_matches(model, data, message):
    with pytest.raises(ConfigError) as e:
        model_labels(_bg(*model), _bg(*data), "ckpt_path=m.pt")
    text = str(e.value)
    assert text.startswith("ckpt_path=m.pt: ") and message in text and "\n" not in text
    assert f"the model's classes ({', '.join(model)})" in text
    assert f"the data's ({', '.join(data)})" in text


def _data(path: Path, names: str) -> Path:
    """One Penn-Fudan photo with COUNTS boxes of each class (1 of a class it lacks); category
    ids 1.. in ``names`` order, so the labels follow it."""
    anns = []
    for name in sorted(names):
        for _ in range(COUNTS.get(name, 1)):
            i = len(anns)
            bbox = [20 + 85 * i, 40 + 10 * i, 70, 120]
            anns.append(
                {"id": i, "image_id": 1, "category_id": names.index(name) + 1, "bbox": bbox}
            )
    blob = {
        "images": [{"id": 1, "file_name": "FudanPed00001.png", "height": 536, "width": 559}],
        "annotations": anns,
        "categories": [{"id": k, "name": n} for k, n in enumerate(names, start=1)],
    }
    path.write_text(json.dumps(blob))
    return path


@pytest.fixture
def scored(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """The model's class name of every ground-truth box scored in validation."""
    seen: Counter = Counter()
    targets = SSDLitModule._targets

    def spy(self: SSDLitModule, batch):
        for labels, mask in zip(batch.labels, batch.mask, strict=True):
            seen.update(self.class_names[int(k)] for k in labels[mask])
        return targets(self, batch)

    monkeypatch.setattr(SSDLitModule, "_targets", spy)
    return seen


def _model(path: Path, names: str) -> Path:
    net = SSD(
        load_option("anchors", "ssd"), num_classes=len(names) + 1, weights="none", image_size=128
    )
    return export_model(net, path, {"class_names": _bg(*names)})


def _eval_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"ckpt_path={model}",
        "data=coco",
        f"data.images_dir={IMAGES}",
        f"data.train_json={data}",
        f"data.val_json={data}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"output={out}",
    ]


@pytest.mark.parametrize("model_names", ["abc", "xabc"], ids=["same", "a-class-more"])
def test_evaluate_scores_each_box_as_the_models_class_of_its_name(
    tmp_path, scored, caplog, model_names
):
    model = _model(tmp_path / "model.pt", model_names)
    data = _data(tmp_path / "val.json", "cab")  # another export: c, a, b are labels 1, 2, 3
    with caplog.at_level(logging.INFO, logger="ssd_lightning.training.classes"):
        evaluate(
            make_cfg(_eval_args(model, data, tmp_path / "e.json"), tmp_path, "evaluate"),
            show=lambda _: None,
        )
    assert scored == COUNTS
    assert "the data's classes matched to the model's by name" in caplog.text


def test_evaluate_refuses_classes_that_match_neither_way(tmp_path):
    model = _model(tmp_path / "model.pt", "abc")
    data = _data(tmp_path / "val.json", "acx")
    r = run_cli(
        "ssd_lightning.evaluate",
        *_eval_args(model, data, tmp_path / "e.json"),
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
    assert last.startswith(f"Config error: ckpt_path={model}: the model's classes (a, b, c)")
    assert "share c at other labels" in last


def test_a_resumed_run_trains_the_checkpoints_classes(tmp_path, scored, caplog):
    """A training file exported again between two epochs, its categories numbered otherwise:
    the resumed run goes on with each box as the class of its name."""
    data = _data(tmp_path / "train.json", "abc")
    args = (
        "data=coco",
        f"data.images_dir={IMAGES}",
        f"data.train_json={data}",
        f"data.val_json={data}",
        "augmentation=none",
    )
    run = tmp_path / "run"
    train(make_cfg(tiny(*args), run))
    assert scored == COUNTS
    scored.clear()
    _data(data, "cab")
    with caplog.at_level(logging.INFO, logger="ssd_lightning.training.classes"):
        metrics = train(make_cfg(tiny(*args, f"resume={run}", trainer__max_epochs=2), run))
    assert metrics["status"] == "completed" and scored == COUNTS
    assert f"resume={run}: the data's classes matched to the model's by name" in caplog.text
    assert load_model(run / "checkpoints" / "last.ckpt")[1]["class_names"] == _bg(*"abc")


@given(st.permutations("abcdef"), st.integers(0, 6))
def test_match_classes_recovers_a_renumbering_and_renames_by_number(order, renamed):
    # another export of the same classes (ids 10.., in another order), ``renamed`` of them
    # renamed: the others are found by name, the renamed ones by their id
    ref = list("abcdef")
    keys = [10 + ref.index(n) for n in order]
    names = [n.upper() if i < renamed else n for i, n in enumerate(order)]
    label_of, by_key = match_classes(keys, names, [10 + i for i in range(6)], ref)
    assert label_of == {c: c - 9 for c in keys}
    assert by_key == keys[:renamed]


def test_match_classes_leaves_a_class_whose_number_another_took_by_name():
    # x's label 1 went to a (matched by name from label 2): x matches neither way
    assert match_classes([1, 2], ["x", "a"], [1, 2], ["a", "b"]) == ({2: 1}, [])
    # a name twice on one side means no single class: by number instead
    assert match_classes([1, 2], ["a", "a"], [1, 2], ["a", "b"]) == ({1: 1, 2: 2}, [1, 2])
