"""data=coco: the COCO reader against the Penn-Fudan reader on the same images, a multi-class
COCO dataset learned end to end (train, predict, evaluate), and every bad input's message."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PENNFUDAN, make_cfg, one_error_line, run_cli, tiny
from hydra.utils import instantiate
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from ssd_lightning.config.cli import message_of
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.paths import load_option
from ssd_lightning.data.batch import collate_fn
from ssd_lightning.data.coco import CocoFormatError, coco_num_classes, read_coco
from ssd_lightning.data.coco_datamodule import CocoDataModule
from ssd_lightning.data.coco_dataset import CocoDataset
from ssd_lightning.data.convert import pennfudan_to_coco
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.gpu.plan import GpuPlanDataset
from ssd_lightning.data.images import read_rgb
from ssd_lightning.data.mask_runs import visible_boxes
from ssd_lightning.data.presets import build_eval_transform, build_fallbacks, build_train_transform
from ssd_lightning.data.segmentation import (
    rle_counts,
    rle_decode,
    rle_encode,
    segmentation_mask,
)
from ssd_lightning.evaluate import evaluate
from ssd_lightning.predict import predict
from ssd_lightning.tools.anchors import report
from ssd_lightning.train import train
from ssd_lightning.training.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "data" / "pennfudan_coco"  # the committed conversion (python -m ...data.convert)
IMAGES = PENNFUDAN / "PNGImages"
NAMES = ["FudanPed00001.png", "FudanPed00002.png", "PennPed00010.png", "PennPed00020.png"]


# -- the RLE codec --------------------------------------------------------------------------------
def test_rle_round_trips_and_reads_compressed_strings():
    # column-major runs, background first: [[0, 1], [1, 1]] -> 1 background, 3 foreground
    mask = np.array([[0, 1], [1, 1]], dtype=bool)
    assert rle_encode(mask, compress=False)["counts"] == [1, 3]
    assert rle_encode(mask)["counts"] == "13"
    assert rle_counts("13") == [1, 3]
    rng = np.random.default_rng(0)
    for _ in range(30):
        m = rng.random((int(rng.integers(1, 12)), int(rng.integers(1, 12)))) > 0.6
        assert np.array_equal(rle_decode(rle_encode(m)), m)
        assert np.array_equal(rle_decode(rle_encode(m, compress=False)), m)


def test_segmentation_mask_falls_back_to_the_box_and_names_a_wrong_size():
    box = torch.tensor([1.0, 0.0, 3.0, 2.0])  # xyxy pixel edges
    filled = np.zeros((3, 4), dtype=bool)
    filled[0:2, 1:3] = True
    assert np.array_equal(segmentation_mask(None, box, 3, 4), filled)  # no segmentation
    empty = rle_encode(np.zeros((3, 4), dtype=bool))
    assert np.array_equal(segmentation_mask(empty, box, 3, 4), filled)  # covers no pixel
    triangle = [[0.0, 0.0, 4.0, 0.0, 0.0, 3.0]]
    assert segmentation_mask(triangle, box, 3, 4)[0, 0]
    # a polygon covers the pixels COCO counts: a 10 x 10 square is 100 pixels, its box its bbox
    square = segmentation_mask([[10, 10, 20, 10, 20, 20, 10, 20]], box, 40, 30)
    assert square.sum() == 100 and square[10:20, 10:20].all()
    two = segmentation_mask([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 8, 5, 8, 8, 5, 8]], box, 10, 10)
    assert two.sum() == 4 + 9  # several polygons: their union
    with pytest.raises(ValueError, match=r"RLE size \[4, 3\] but the image is 3x4"):
        segmentation_mask(rle_encode(np.ones((4, 3), dtype=bool)), box, 3, 4)


# -- the two readers on the same images -----------------------------------------------------------
def test_conversion_is_the_committed_one_and_gives_the_pennfudan_samples():
    val = json.loads((COCO / "val.json").read_text())
    names = [im["file_name"] for im in val["images"][:6]]
    fresh = pennfudan_to_coco(PENNFUDAN, names)
    committed_ids = {im["id"] for im in val["images"][:6]}
    assert fresh["images"] == val["images"][:6]
    assert [a["bbox"] for a in fresh["annotations"]] == [
        a["bbox"] for a in val["annotations"] if a["image_id"] in committed_ids
    ]
    ann = read_coco(COCO / "val.json", IMAGES)
    coco = CocoDataset(ann, range(12), with_masks=True)  # a dozen: decoding is the cost
    pf = PennFudanDataset(PENNFUDAN, coco.names, with_masks=True)
    assert coco.class_names == ["background", "pedestrian"]
    for i in range(len(coco)):
        _, a = coco.raw(i)
        _, b = pf.raw(i)
        assert (a["boxes"] - b["boxes"]).abs().max() <= 1.0  # exact, in fact
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["mask_runs"], b["mask_runs"])  # RLE -> the same instance masks


def test_same_val_map_from_the_same_checkpoint(tiny_run: dict, tmp_path: Path):
    ckpt = f"ckpt_path={tiny_run['dir'] / 'checkpoints' / 'last.ckpt'}"
    common = ["data.num_workers=0", "data.batch_size=10", "trainer.accelerator=cpu"]
    common += ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=2"]
    out = {}
    for data in ("pennfudan", "pennfudan_coco"):
        cfg = make_cfg([ckpt, f"data={data}", f"output={tmp_path / data}.json", *common],
                       tmp_path / data, "evaluate")  # fmt: skip
        out[data] = evaluate(cfg)
    for key in ("map", "map_50", "map_75", "mar_100", "val/loss", "num_images"):
        assert out["pennfudan_coco"][key] == pytest.approx(out["pennfudan"][key], abs=1e-6), key
    assert out["pennfudan_coco"]["num_images"] == 50


def test_anchor_report_on_coco_measures_its_training_boxes(compose_cfg):
    cfg = compose_cfg(["data=pennfudan_coco", "anchors=ssd"])
    rep = report(cfg)
    blob = json.loads((COCO / "train.json").read_text())
    assert rep["coverage"]["boxes"] == len(blob["annotations"])
    assert 0 < rep["coverage"]["bpr"] <= 1


# -- a multi-class dataset --------------------------------------------------------------------
PED, DISC, SQUARE = 7, 3, 12  # category ids of any value


def _free_spot(rng, taken: list[list[float]], w: int, h: int, side: int) -> list[int]:
    """The square of ``side`` overlapping the boxes ``taken`` least, of 200 seeded draws."""
    xy = np.stack([rng.integers(0, w - side, 200), rng.integers(0, h - side, 200)], 1)
    cand = torch.tensor(np.concatenate([xy, xy + side], 1), dtype=torch.float)  # (200, 4)
    overlap = box_iou(cand, torch.tensor(taken, dtype=torch.float)).max(1).values
    return [int(v) for v in cand[int(overlap.argmin())].tolist()]


def make_shapes_dataset(out: Path) -> dict[str, Any]:
    """Two Penn-Fudan images (three pedestrians, as RLE) with a blue disc (polygon) and a red
    square (boxes only) pasted on each, one crowd region; category ids 7 / 3 / 12."""
    rng = np.random.default_rng(0)
    images_dir = out / "images"
    images_dir.mkdir(parents=True)
    blob = pennfudan_to_coco(PENNFUDAN, NAMES[:2])  # few images: a short CPU run learns them
    anns = [{**a, "category_id": PED} for a in blob["annotations"]]
    for im in blob["images"]:
        img = Image.open(IMAGES / im["file_name"]).convert("RGB")
        w, h = img.size
        draw = ImageDraw.Draw(img)
        taken = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
            if a["image_id"] == im["id"]
        ]
        side = int(0.25 * min(w, h))
        for cat in (DISC, SQUARE):
            x0, y0, x1, y1 = _free_spot(rng, taken, w, h, side)
            taken.append([x0, y0, x1, y1])
            ann = {"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "iscrowd": 0}
            ann["bbox"] = [x0, y0, side, side]
            if cat == DISC:
                t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                r = side / 2
                poly = np.stack([x0 + r + r * np.cos(t), y0 + r + r * np.sin(t)], 1)
                draw.polygon([tuple(p) for p in poly], fill=(30, 60, 230))
                ann["segmentation"] = [poly.reshape(-1).round(1).tolist()]
            else:
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(230, 40, 30))
            anns.append(ann)
        img.save(images_dir / im["file_name"])
    first = blob["images"][0]  # a crowd region: left out of training, ignored by the mAP
    crowd = np.zeros((first["height"], first["width"]), dtype=bool)
    crowd[:20, :20] = True
    anns.append(
        {
            "id": len(anns) + 1,
            "image_id": first["id"],
            "category_id": PED,
            "iscrowd": 1,
            "bbox": [0, 0, 20, 20],
            "segmentation": rle_encode(crowd, compress=False),
        }
    )
    categories = [
        {"id": SQUARE, "name": "square"},
        {"id": PED, "name": "pedestrian"},
        {"id": DISC, "name": "disc"},
    ]
    data = {"images": blob["images"], "annotations": anns, "categories": categories}
    (out / "train.json").write_text(json.dumps(data))
    return {"images_dir": images_dir, "json": out / "train.json", "blob": data}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))


def test_categories_map_to_contiguous_labels_and_crowd_is_kept_apart(shapes):
    ann = read_coco(shapes["json"], shapes["images_dir"])
    assert ann.category_ids == [DISC, PED, SQUARE]
    assert ann.class_names == ["background", "disc", "pedestrian", "square"]
    train_set = CocoDataset(ann, train=True, with_masks=True)
    val_set = CocoDataset(ann, transforms=build_eval_transform(128))
    _, t_train = train_set.raw(0)
    assert "crowd" not in t_train and len(t_train["boxes"]) == len(t_train["mask_runs"])
    batch = collate_fn([val_set[i] for i in range(len(val_set))])
    assert batch.crowd is not None and int(batch.crowd.sum()) == 1
    assert int(batch.mask.sum()) == len(shapes["blob"]["annotations"])
    assert set(batch.labels[batch.mask].tolist()) == {1, 2, 3}
    # the mask-tight boxes: the disc's polygon rasterized, the square (no segmentation) filled
    disc = t_train["labels"] == 1
    tight, _ = visible_boxes(t_train["mask_runs"])
    assert (tight[disc] - t_train["boxes"][disc]).abs().max() <= 1.5


def test_gpu_plan_path_takes_coco_masks(shapes):
    aug = load_option("augmentation", "safe_crop")
    ann = read_coco(shapes["json"], shapes["images_dir"])
    cpu = CocoDataset(
        ann, None, build_train_transform(aug, 128), build_fallbacks(aug, 128), True, True
    )
    plans = GpuPlanDataset(cpu)
    for seed in range(6):
        torch.manual_seed(seed)
        _, t = cpu[seed % len(cpu)]
        torch.manual_seed(seed)
        _, t2 = plans[seed % len(cpu)]
        assert torch.equal(t["boxes"], t2["boxes"]) and torch.equal(t["labels"], t2["labels"])


def _found_per_class(detections: list[dict], blob: dict) -> dict[str, list[int]]:
    """class -> [found, total] over the images: a GT box is found by a detection of its class
    with IoU >= 0.5."""
    names = {c["id"]: c["name"] for c in blob["categories"]}
    out: dict[str, list[int]] = {n: [0, 0] for n in names.values()}
    by_file = {r["file"].rsplit("/", 1)[-1]: r for r in detections}
    for im in blob["images"]:
        dets = by_file[im["file_name"]]["detections"]
        for a in blob["annotations"]:
            if a["image_id"] != im["id"] or a["iscrowd"]:
                continue
            x, y, w, h = a["bbox"]
            gt = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float)
            name = names[a["category_id"]]
            same = [d["box_xyxy"] for d in dets if d["class"] == name]
            hit = bool(same) and box_iou(gt, torch.tensor(same)).max() >= 0.5
            out[name][0] += int(hit)
            out[name][1] += 1
    return out


@pytest.mark.slow  # ~2.5 min on 2 idle cores (60 steps at 192 px)
def test_multiclass_coco_learns_every_class_then_predicts_and_evaluates(shapes, tmp_path):
    """A short CPU run (resize only, two images, 3 classes) finds every box of every class on
    its training images; predict names the classes, evaluate gives per-class AP."""
    epochs = 60
    data = [
        "data=coco",
        f"data.images_dir={shapes['images_dir']}",
        f"data.train_json={shapes['json']}",
        f"data.val_json={shapes['json']}",  # evaluated on its training images
        "augmentation=none",
        "anchors=ssd",  # the shapes are square
    ]
    overrides = tiny(
        *data,
        "scheduler=none",  # the whole lr for all 60 steps (the default decays it)
        "model.ema_decay=null",  # the trained weights: 60 steps leave the average behind them
        "optimizer=adam",  # no weight decay: a long run's regularizer, nothing to a 60-step fit
        model__net__image_size=192,
        data__batch_size=2,
        trainer__max_epochs=epochs,
        trainer__limit_train_batches=1,
        trainer__check_val_every_n_epoch=epochs,
        callbacks__prediction_images__every_n_epochs=epochs,
        callbacks__prediction_images__max_images=2,
        callbacks__last_checkpoint__every_n_epochs=epochs,  # one write, not one per epoch
    )
    run = tmp_path / "run"
    metrics = train(make_cfg(overrides, run))
    assert metrics["status"] == "completed"
    best = run / "ssd_resnet34_best.pt"
    net, info = load_model(best)
    assert net.num_classes == 4
    assert info["class_names"] == ["background", "disc", "pedestrian", "square"]
    assert load_model(run / "checkpoints" / "last.ckpt")[1]["class_names"] == info["class_names"]

    result = predict(best, shapes["images_dir"], tmp_path / "pred")
    assert result["class_names"] == info["class_names"]
    found = _found_per_class(result["images"], shapes["blob"])
    assert all(f == t and t > 0 for f, t in found.values()), found
    written = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert {d["class"] for r in written["images"] for d in r["detections"]} == {
        "disc",
        "pedestrian",
        "square",
    }

    cfg = make_cfg(
        [f"ckpt_path={best}", *data[:4], "data.num_workers=0", "trainer.accelerator=cpu"],
        tmp_path / "eval",
        "evaluate",
    )
    ev = evaluate(cfg)
    assert set(ev["map_per_class"]) == {"disc", "pedestrian", "square"}
    assert all(ap > 0 for ap in ev["map_per_class"].values()), ev["map_per_class"]


# -- bad input ------------------------------------------------------------------------------------
def _write(tmp_path: Path, blob: Any, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(blob))
    return path


def _small() -> dict:
    return {
        "images": [{"id": 1, "file_name": NAMES[0], "height": 536, "width": 559}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 5, "bbox": [160, 180, 140, 250]}],
        "categories": [{"id": 5, "name": "person"}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["images"][0].update(file_name="nope.png"), "images[0] (id 1): image file"),
        (
            lambda b: b["annotations"][0].update(category_id=9),
            "annotations[0] (id 10): unknown category_id 9 (the categories are 5)",
        ),  # fmt: skip
        (
            lambda b: b["images"].append(dict(b["images"][0], file_name=NAMES[1])),
            "images[1]: duplicate image id 1 (also images[0])",
        ),  # fmt: skip
        (lambda b: b.update(images=[], annotations=[]), "an empty dataset"),
        (lambda b: b.pop("categories"), "not a COCO detection file"),
        (lambda b: b["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] (id 10): 'bbox'"),
        (lambda b: b["annotations"][0].update(image_id=4), "image_id 4 is not the id of any"),
        (
            lambda b: b["annotations"].append([1, 5, [0, 0, 5, 5]]),
            "annotations[1]: expected an object, got a list",
        ),  # fmt: skip
        (lambda b: b["images"].insert(0, "x.png"), "images[0]: expected an object, got a string"),
        (lambda b: b["categories"].append(None), "categories[1]: expected an object, got null"),
    ],
)
def test_bad_files_name_the_file_and_the_entry(tmp_path, change, message):
    blob = _small()
    change(blob)
    path = _write(tmp_path, blob)
    with pytest.raises(CocoFormatError) as e:
        read_coco(path, IMAGES)
    assert str(path) in str(e.value) and message in str(e.value)


def test_not_json_or_not_coco(tmp_path):
    for text in ("{not json", "[1, 2]", json.dumps({"images": {}})):
        path = tmp_path / "x.json"
        path.write_text(text)
        with pytest.raises(CocoFormatError, match=str(path)):
            read_coco(path, IMAGES)
    with pytest.raises(CocoFormatError, match="no such file"):
        read_coco(tmp_path / "missing.json", IMAGES)


def test_boxes_outside_or_without_size_are_clipped_or_dropped_and_counted(tmp_path, caplog):
    blob = _small()
    a = blob["annotations"][0]
    blob["annotations"] += [
        dict(a, id=11, bbox=[500, 400, 100, 200]),  # partly outside: clipped to 559 x 536
        dict(a, id=12, bbox=[10, 10, 0, 20]),  # no width: dropped
        dict(a, id=13, bbox=[10, 10, 20, -3]),  # negative height: dropped
        dict(a, id=14, bbox=[600, 600, 10, 10]),  # wholly outside: dropped
    ]
    path = _write(tmp_path, blob)
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data.coco"):
        ann = read_coco(path, IMAGES)
    assert ann.clipped == 1 and ann.dropped == 3
    assert (
        f"{path}: 1 box(es) clipped to their image (annotations[1] (id 11)), 3 dropped "
        "(non-positive size or outside the image) (annotations[2] (id 12), annotations[3] "
        "(id 13), annotations[4] (id 14))"
    ) in caplog.text
    assert ann.images[0].boxes.tolist() == [[160, 180, 300, 430], [500, 400, 559, 536]]


def test_polygons_of_fewer_than_3_points_are_ignored_and_counted(tmp_path, caplog):
    # labelling tools export mis-clicks as 1- or 2-point polygons: no area, not a broken file
    blob = _small()
    a = blob["annotations"][0]
    good = [160, 180, 300, 180, 300, 430]
    blob["annotations"] += [
        dict(a, id=11, segmentation=[[170, 190, 200, 220]]),  # 2 points: the box instead
        dict(a, id=12, segmentation=[good, [5, 5]]),  # the rest of the segmentation stays
        dict(a, id=13, segmentation=[[]], iscrowd="0"),  # "0" is no crowd
    ]
    path = _write(tmp_path, blob)
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data.coco"):
        ann = read_coco(path, IMAGES)
    assert ann.images[0].segmentations == [None, None, [good], None]
    assert not ann.images[0].crowd.any()
    assert f"{path}: 3 polygon(s) of fewer than 3 points ignored" in caplog.text
    blob["annotations"][1]["segmentation"] = [[*good, 7]]  # odd: broken, not degenerate
    with pytest.raises(CocoFormatError, match=r"annotations\[1\] \(id 11\): 'segmentation'"):
        read_coco(_write(tmp_path, blob), IMAGES)


def test_an_unreadable_image_of_an_entry_without_a_size_is_named_with_the_entry(tmp_path):
    (tmp_path / "broken.jpg").write_text("not an image")
    blob = _small()
    blob["images"][0] = {"id": 1, "file_name": "broken.jpg"}  # its size read from the file
    path = _write(tmp_path, blob)
    with pytest.raises(CocoFormatError, match=r"images\[0\] \(id 1\): cannot read image file"):
        read_coco(path, tmp_path)


def test_a_val_file_of_other_category_ids_is_matched_by_name(tmp_path, caplog):
    blob = _small()
    blob["categories"].append({"id": 8, "name": "bike"})
    blob["annotations"].append(dict(blob["annotations"][0], id=11, category_id=8))
    train = read_coco(_write(tmp_path, blob, "train.json"), IMAGES)
    assert train.class_names == ["background", "person", "bike"]
    # another export of the same classes: other ids, another order
    blob["categories"] = [{"id": 1, "name": "bike"}, {"id": 2, "name": "person"}]
    blob["annotations"][0]["category_id"], blob["annotations"][1]["category_id"] = 2, 1
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data.coco_categories"):
        val = read_coco(_write(tmp_path, blob, "val.json"), IMAGES, train)
    assert val.images[0].labels.tolist() == [1, 2] and val.class_names == train.class_names
    assert "by name (id here -> there): bike 1 -> 8, person 2 -> 5" in caplog.text
    blob["categories"].append({"id": 3, "name": "car"})  # a class training never saw
    blob["annotations"][1]["category_id"] = 3
    with pytest.raises(CocoFormatError, match=r"category_id 3 \(car\) is not a class of .*train"):
        read_coco(_write(tmp_path, blob, "val.json"), IMAGES, train)


def test_a_windows_file_name_finds_its_image(tmp_path):
    # Windows tools export file_name with backslashes; a name that exists as written stays
    (tmp_path / "images" / "train").mkdir(parents=True)
    shutil.copy(IMAGES / NAMES[0], tmp_path / "images" / "train" / "a.png")
    shutil.copy(IMAGES / NAMES[0], tmp_path / "odd\\name.png")  # a file name with a backslash
    blob = _small()
    blob["images"][0]["file_name"] = "images\\train\\a.png"
    blob["images"].append(dict(blob["images"][0], id=2, file_name="odd\\name.png"))
    ann = read_coco(_write(tmp_path, blob), tmp_path)
    assert [e.file_name for e in ann.images] == ["images/train/a.png", "odd\\name.png"]
    img, target = CocoDataset(ann).raw(0)
    assert img.shape[-2:] == (536, 559) and len(target["boxes"]) == 1
    blob["images"][1]["file_name"] = "images/train/a.png"  # the same file, written both ways
    with pytest.raises(CocoFormatError, match=r"images\[1\] \(id 2\): file_name images/train/a"):
        read_coco(_write(tmp_path, blob), tmp_path)


def test_a_roboflow_placeholder_category_is_no_class(tmp_path, caplog):
    # Roboflow: category 0 is the dataset's name, the supercategory of the real ones, unused
    blob = _small()
    blob["categories"] = [
        {"id": 0, "name": "people", "supercategory": "none"},
        {"id": 5, "name": "person", "supercategory": "people"},
        {"id": 6, "name": "bike", "supercategory": "people"},  # unused, but no placeholder
        {"id": 7, "name": "dog", "supercategory": "dog"},  # its own supercategory, as in COCO
    ]
    path = _write(tmp_path, blob, "train.json")
    with caplog.at_level(logging.INFO, logger="ssd_lightning.data.coco"):
        train = read_coco(path, IMAGES)
    assert train.class_names == ["background", "person", "bike", "dog"]
    assert train.category_ids == [5, 6, 7] and train.images[0].labels.tolist() == [1]
    assert coco_num_classes(path) == 4  # what model.net.num_classes follows
    assert f"{path}: category 0 (people) left out: no annotation uses it" in caplog.text
    # a val file of the same export matches; one that annotates the placeholder is refused
    val = read_coco(_write(tmp_path, blob, "val.json"), IMAGES, train)
    assert val.class_names == train.class_names and val.images[0].labels.tolist() == [1]
    blob["annotations"][0]["category_id"] = 0
    with pytest.raises(CocoFormatError, match=r"category_id 0 \(people\) is not a class of"):
        read_coco(_write(tmp_path, blob, "val.json"), IMAGES, train)
    # annotated in the training file, it is a class like any other
    assert read_coco(_write(tmp_path, blob, "t2.json"), IMAGES).class_names[1] == "people"


def test_an_image_of_another_size_than_its_entry_is_named(tmp_path):
    # refused when the file is read (its boxes would be clipped at the wrong edges), not later
    blob = _small()
    blob["images"][0]["height"] = 500
    with pytest.raises(CocoFormatError, match=r"images\[0\] \(id 1\): says 500x559 \(HxW\) but"):
        read_coco(_write(tmp_path, blob), IMAGES)
    # an image replaced after the file was read: refused where it is loaded
    shutil.copy(IMAGES / NAMES[0], tmp_path / "photo.png")
    blob = _small()
    blob["images"][0]["file_name"] = "photo.png"
    ds = CocoDataset(read_coco(_write(tmp_path, blob), tmp_path))
    Image.open(IMAGES / NAMES[1]).save(tmp_path / "photo.png")
    with pytest.raises(CocoFormatError, match="image id 1 says 536x559"):
        ds.raw(0)


def test_an_image_that_fails_to_decode_is_named_with_its_entry(tmp_path):
    data = (IMAGES / NAMES[0]).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # the header reads, the rest not
    blob = _small()
    blob["images"][0]["file_name"] = "cut.png"
    path = _write(tmp_path, blob)
    with pytest.raises(CocoFormatError, match=r"images\[0\] \(id 1\): cannot read image file"):
        read_coco(path, tmp_path)  # caught at start-up, with the size given or not
    (tmp_path / "cut.png").write_bytes(data)
    ds = CocoDataset(read_coco(path, tmp_path))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # broken after the start-up
    with pytest.raises(CocoFormatError, match=rf"{path}: image id 1: image file .*cut.png"):
        ds.raw(0)


def test_a_file_name_too_long_for_the_file_system_is_named_with_its_entry(tmp_path):
    blob = _small()
    blob["images"][0]["file_name"] = "x" * 300 + ".png"
    with pytest.raises(CocoFormatError, match=r"images\[0\] \(id 1\): image file .*too long"):
        read_coco(_write(tmp_path, blob), IMAGES)


def test_a_broken_rle_is_named_when_the_file_is_read(tmp_path):
    good = rle_encode(np.ones((536, 559), dtype=bool))
    blob = _small()
    for seg, message in [
        ({"size": [536, 559], "counts": "o"}, "end in the middle of a number"),
        ({"size": [536, 559], "counts": good["counts"][:-1]}, "compressed RLE counts"),
        ({"size": [536, 559], "counts": [5, 3]}, "cover 8 pixels, not 536x559"),
        ({"size": [536, -1], "counts": [5]}, "'size' must be"),
        ({"size": [20, 10], "counts": [200]}, "RLE size [20, 10] but image id 1 is 536x559"),
    ]:
        blob["annotations"][0]["segmentation"] = seg
        with pytest.raises(CocoFormatError, match=r"annotations\[0\] \(id 10\): ") as e:
            read_coco(_write(tmp_path, blob), IMAGES)
        assert message in str(e.value)


def test_categories_sharing_a_name_stay_apart(tmp_path, caplog):
    blob = _small()
    blob["categories"] = [{"id": 42, "name": "thing"}, {"id": 7, "name": "thing"}]
    blob["annotations"].append(dict(blob["annotations"][0], id=11, category_id=42))
    blob["annotations"][0]["category_id"] = 7
    with caplog.at_level(logging.WARNING):
        ann = read_coco(_write(tmp_path, blob), IMAGES)
    assert ann.class_names == ["background", "thing (id 7)", "thing (id 42)"]
    assert "share a name" in caplog.text


def test_a_json_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_text(json.dumps(_small()), encoding="utf-8-sig")  # as some Windows tools write
    assert read_coco(path, IMAGES).class_names == ["background", "person"]


def test_val_images_in_a_folder_of_their_own(tmp_path):
    # Roboflow / CVAT exports: train/ and valid/, each with its images and its JSON
    for part, name in (("train", NAMES[0]), ("valid", NAMES[1])):
        (tmp_path / part).mkdir()
        shutil.copy(IMAGES / name, tmp_path / part / name)
        blob = pennfudan_to_coco(PENNFUDAN, [name])
        _write(tmp_path / part, blob, "_annotations.coco.json")
    dm = CocoDataModule(
        images_dir=tmp_path / "train",
        train_json=tmp_path / "train" / "_annotations.coco.json",
        val_json=tmp_path / "valid" / "_annotations.coco.json",
        val_images_dir=tmp_path / "valid",
        num_workers=0,
        preload=False,
        augmentation=load_option("augmentation", "none"),
    )
    dm.setup("fit")
    assert dm.train_set.names == [NAMES[0]] and dm.val_set.names == [NAMES[1]]
    assert dm.val_set.image_path(0) == tmp_path / "valid" / NAMES[1]
    with pytest.raises(CocoFormatError, match="data.val_images_dir="):
        CocoDataModule(
            images_dir=tmp_path / "train",
            train_json=tmp_path / "train" / "_annotations.coco.json",
            val_json=tmp_path / "valid" / "_annotations.coco.json",
            val_images_dir=tmp_path / "nope",
        )


def test_coco_without_its_paths_names_the_key(compose_cfg):
    cfg = compose_cfg(["data=coco"])
    with pytest.raises(Exception) as e:
        instantiate(cfg.data)
    assert message_of(e.value) == (
        "data.images_dir is not set (its config says ???): give it, e.g. data.images_dir=<value>"
    )


@pytest.mark.parametrize(
    ("orientation", "entry_hw", "as_shown"),
    [
        (6, (40, 20), True),  # a phone's portrait photo, annotated as displayed
        (6, (20, 40), False),  # ... by a tool that ignored the orientation: the entry says so
        (3, (20, 40), True),  # upside down: the sizes agree, the photo as displayed
        (6, None, True),  # an entry without a size: the photo as displayed
    ],
)
def test_photos_are_read_in_the_orientation_they_were_annotated(
    tmp_path, orientation, entry_hw, as_shown
):
    rgb = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high; red left, blue right
    rgb[:, :20, 0] = rgb[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    Image.fromarray(rgb).save(tmp_path / "photo.png", exif=exif)
    size = {} if entry_hw is None else {"height": entry_hw[0], "width": entry_hw[1]}
    blob = {
        "images": [{"id": 1, "file_name": "photo.png", **size}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    ds = CocoDataset(read_coco(_write(tmp_path, blob), tmp_path))
    img, target = ds.raw(0)
    expected = read_rgb(tmp_path / "photo.png", exif_transpose=as_shown)
    assert torch.equal(img, expected) and tuple(img.shape[-2:]) == (entry_hw or (40, 20))
    assert not torch.equal(expected, read_rgb(tmp_path / "photo.png", exif_transpose=not as_shown))
    assert target["boxes"].tolist() == [[2, 2, 12, 12]]


def test_seeded_split_is_recorded_and_reused(tmp_path):
    blob = pennfudan_to_coco(PENNFUDAN, NAMES * 1)
    shutil.copy(COCO / "val.json", tmp_path / "all.json")
    kwargs = dict(images_dir=IMAGES, train_json=tmp_path / "all.json", val_size=10, preload=False)
    m = CocoDataModule(num_workers=0, **kwargs)
    m.setup("fit")
    assert (tmp_path / "all_split.json").is_file() and len(m.val_set) == 10
    again = CocoDataModule(num_workers=0, **kwargs)  # read back
    again.setup("fit")
    assert again.val_set.names == m.val_set.names
    other = CocoDataModule(num_workers=0, split_seed=1, **kwargs)  # another seed: its own split
    other.setup("fit")
    assert (tmp_path / "all_split_seed1.json").is_file()
    assert other.val_set.names != m.val_set.names and len(other.val_set) == 10
    wrong = CocoDataModule(
        num_workers=0, split_seed=1, split_file=tmp_path / "all_split.json", **kwargs
    )
    with pytest.raises(CocoFormatError, match="seed 20240601, not data.split_seed=1"):
        wrong.setup("fit")
    assert len(m.train_set) + len(m.val_set) == 50 and blob["categories"]
    with pytest.raises(ValueError, match="data.num_classes=3"):
        CocoDataModule(num_classes=3, **kwargs)


def test_cli_bad_coco_is_one_message(tmp_path):
    blob = _small()
    blob["annotations"][0]["category_id"] = 9
    path = _write(tmp_path, blob)
    r = run_cli(
        "ssd_lightning.train",
        "data=coco",
        f"data.images_dir={IMAGES}",
        f"data.train_json={path}",
        "data.val_json=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Data error:") and "unknown category_id 9" in lines[-1]
    assert "Traceback" not in r.stderr


def test_cli_missing_coco_file_is_one_message(tmp_path):
    r = run_cli(
        "ssd_lightning.train",
        "data=coco",
        f"data.images_dir={IMAGES}",
        f"data.train_json={tmp_path / 'nope.json'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr
    last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("Data error:") and "nope.json: no such file" in last


def test_convert_cli_bad_root_or_split_is_one_message(tmp_path):
    split = {"val_size": 1, "order": ["x.png", "y.png"], "val": ["x.png"]}  # no Penn-Fudan image
    (tmp_path / "split.json").write_text(json.dumps(split))
    for args, message in [
        (["--root", str(tmp_path)], f"--root {tmp_path}: no Penn-Fudan images"),
        (["--split", str(tmp_path / "nope.json")], "nope.json: no such file"),
        (["--split", str(tmp_path / "split.json")], "2 image(s) not under"),
    ]:
        r = run_cli("ssd_lightning.data.convert", *args, "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
        assert last.startswith("Data error:") and message in last, last
    assert not (tmp_path / "out").exists()
    r = run_cli("ssd_lightning.data.convert", "--split")  # argparse's mistake: one line too
    assert "--split" in one_error_line(r), r.stderr


def test_a_split_that_leaves_nothing_to_train_is_one_message(tmp_path):
    """data.val_size larger than the export (or the default fraction of a one-image export):
    one config message naming the file and what is allowed, from every tool, no traceback."""
    path = _write(tmp_path, _small())  # one image
    for val_size in ("0.2", "5"):
        r = run_cli(
            "ssd_lightning.anchors",
            "data=coco",
            f"data.images_dir={IMAGES}",
            f"data.train_json={path}",
            "data.val_json=null",
            f"data.val_size={val_size}",
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"Config error: data.val_size={val_size}: {path} has 1 image(s)" in r.stderr
        assert "allowed: 0)" in r.stderr
    kwargs = dict(images_dir=IMAGES, train_json=COCO / "val.json", preload=False, num_workers=0)
    m = CocoDataModule(val_size=50, split_file=tmp_path / "split.json", **kwargs)
    with pytest.raises(ConfigError, match="has 50 image.*allowed: an integer 0 to 49"):
        m.setup("fit")
