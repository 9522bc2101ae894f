"""The command-line tools end to end: evaluate, predict (any photo), and clean config errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_cfg, run_cli
from PIL import Image

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.config.overrides import quote_paths
from ssd_lightning.config.validation import validate_config
from ssd_lightning.data.images import InputError, read_rgb
from ssd_lightning.evaluate import evaluate
from ssd_lightning.predict import output_names, predict
from ssd_lightning.predict import task as predict_task
from ssd_lightning.training.checkpoint import CheckpointError

PED = ROOT / "data" / "PennFudanPed" / "PNGImages" / "FudanPed00001.png"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of awkward inputs made from a real Penn-Fudan image."""
    d = tmp_path_factory.mktemp("photos")
    im = Image.open(PED)
    im.convert("L").save(d / "gray.png")
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    im.resize((1001, 333)).save(d / "wide.JPG", quality=85)  # odd size, upper-case suffix
    Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257).save(d / "deep16.png")
    im.convert("P").save(d / "palette.gif")
    (d / "readme.txt").write_text("not an image")
    return d


def test_read_rgb_any_mode(photos: Path) -> None:
    for name in ["gray.png", "rgba.png", "wide.JPG", "deep16.png", "palette.gif"]:
        img = read_rgb(photos / name)
        assert img.shape[0] == 3 and img.dtype.is_floating_point is False
    assert read_rgb(photos / "wide.JPG").shape[1:] == (333, 1001)
    assert read_rgb(photos / "deep16.png").float().mean() > 20  # scaled down, not clipped to 255


@pytest.mark.parametrize("model_file", ["ssd_resnet34_best.pt", "checkpoints/last.ckpt"])
def test_predict_folder(tiny_run: dict, photos: Path, tmp_path: Path, model_file: str) -> None:
    result = predict(tiny_run["dir"] / model_file, photos, tmp_path, score_threshold=0.0)
    assert result["thresholds"] == {"score_threshold": 0.0, "nms_threshold": 0.45, "top_k": 20}
    assert len(result["images"]) == 5  # readme.txt is not an image
    saved = json.loads((tmp_path / "detections.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for rec in result["images"]:
        h, w = rec["height"], rec["width"]
        assert len(rec["detections"]) == 20  # score 0: top_k boxes survive
        for det in rec["detections"]:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h  # original image pixels
            assert det["class"] == "pedestrian"
        with Image.open(rec["output"]) as drawn:
            assert drawn.size == (w, h) and drawn.mode == "RGB"


def test_predict_errors_name_the_input(tiny_run: dict, photos: Path, tmp_path: Path) -> None:
    model = tiny_run["dir"] / "ssd_resnet34_best.pt"
    with pytest.raises(InputError, match="nowhere.jpg"):
        predict(model, tmp_path / "nowhere.jpg", tmp_path / "out")
    with pytest.raises(InputError, match=r"readme\.txt"):
        predict(model, photos / "readme.txt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="missing.pt"):
        predict(tmp_path / "missing.pt", photos, tmp_path / "out")


def test_predict_cli(tiny_run: dict, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={tiny_run['dir'] / 'checkpoints/last.ckpt'}",
        f"input={photos / 'gray.png'}",
        f"hydra.run.dir={out}",
        "top_k=3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "detections.json").read_text())
    assert len(result["images"]) == 1 and result["thresholds"]["top_k"] == 3
    assert (out / "gray_pred.png").is_file()
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={tiny_run['dir'] / 'checkpoints/last.ckpt'}",
        f"input={tmp_path / 'nope'}",
        f"hydra.run.dir={tmp_path / 'p2'}",
    )
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_cli(tiny_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    r = run_cli(
        "ssd_lightning.evaluate",
        f"ckpt_path={tiny_run['dir'] / 'checkpoints/last.ckpt'}",
        "data.val_size=4",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.preload=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AP   @[IoU=0.50      | area=   all | maxDets=100]" in r.stdout
    metrics = json.loads((out / "eval_metrics.json").read_text())
    for key in ["map", "map_50", "map_75", "mar_100", "val/loss"]:
        assert -1 <= metrics[key] <= 1 or key == "val/loss"
    assert metrics["num_images"] == 4 and metrics["image_size"] == 128


def test_train_cli_config_error_is_clean(tmp_path: Path) -> None:
    r = run_cli(
        "ssd_lightning.train",
        "anchors=tall_skinny",
        "anchors.ratios=[0.5,-1.0]",
        f"hydra.run.dir={tmp_path}",
    )
    assert r.returncode == 2
    assert "anchors.ratios" in r.stderr and "> 0" in r.stderr
    assert "Traceback" not in r.stderr
    # the default preset lists fitted pairs: ratios build on the preset behind them, checked alike
    # (an unknown preset: test_console.test_a_missing_option_is_one_line_listing_the_options)
    with pytest.raises(ConfigError, match=r"anchors\.ratios.*> 0"):
        validate_config(make_cfg(["anchors.ratios=[-1.0]"], tmp_path / "default"))


def test_predict_rejects_bad_thresholds_and_keeps_same_stem_outputs_apart(
    tiny_run: dict, tmp_path: Path
) -> None:
    model = tiny_run["dir"] / "ssd_resnet34_best.pt"
    for kwargs, key in (
        ({"score_threshold": 2.0}, "score_threshold=2.0"),
        ({"nms_threshold": 0}, "nms_threshold=0"),
        ({"top_k": 0}, "top_k=0"),
    ):
        with pytest.raises(InputError, match=key):
            predict(model, PED, tmp_path / "out", **kwargs)
    same = tmp_path / "same"
    same.mkdir()
    Image.open(PED).save(same / "a.png")
    Image.open(PED).convert("RGB").save(same / "a.jpg")
    Image.open(PED).save(same / "a.PNG")  # the same name on a case-insensitive disk
    result = predict(model, same, tmp_path / "out2")
    outputs = [Path(r["output"]).name for r in result["images"]]
    assert sorted(outputs) == ["a_PNG_pred.png", "a_jpg_pred.jpg", "a_png_2_pred.png"]
    assert len({o.lower() for o in outputs}) == 3
    assert len(list((tmp_path / "out2").glob("*_pred.*"))) == 3


def test_drawn_output_names_never_collide() -> None:
    files = [Path(n) for n in ("a.png", "a.jpg", "a_png.png", "B.png", "b.jpeg", "c.tif")]
    names = output_names(files)
    assert names[Path("c.tif")] == "c_pred.png" and names[Path("a.jpg")] == "a_jpg_pred.jpg"
    assert len({n.lower() for n in names.values()}) == len(files)


def test_cli_user_mistakes_are_one_message(tiny_run: dict, tmp_path: Path) -> None:
    r = run_cli("ssd_lightning.evaluate", f"hydra.run.dir={tmp_path / 'e'}")  # no ckpt_path
    assert r.returncode == 2 and "ckpt_path" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(
        "ssd_lightning.train",
        f"data.root={tmp_path / 'nowhere'}",
        "data.num_workers=0",
        "model.net.weights=none",
        f"hydra.run.dir={tmp_path / 't'}",
    )
    assert r.returncode == 2 and "Data error" in r.stderr and "Traceback" not in r.stderr
    assert "nowhere" in r.stderr


def test_paths_hydra_cannot_parse_are_read_as_typed(
    tiny_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File names with =, brackets, non-ASCII letters or a leading ~ (zsh leaves key=~/x to the
    program) are paths, not override syntax errors; valid overrides are left alone."""
    home = tmp_path / "home"
    photos = home / "fotos (2024)"
    photos.mkdir(parents=True)
    Image.open(PED).convert("RGB").save(photos / "a=b [1] café.jpg")
    monkeypatch.setenv("HOME", str(home))
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={tiny_run['dir'] / 'ssd_resnet34_best.pt'}",
        "input=~/fotos (2024)/a=b [1] café.jpg",
        f"output_dir={tmp_path / 'out=é'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out=é" / "detections.json").read_text())
    assert [Path(i["file"]) for i in result["images"]] == [photos / "a=b [1] café.jpg"]
    assert (tmp_path / "out=é" / "a=b [1] café_pred.jpg").is_file()

    assert quote_paths(["input=a.jpg,b.jpg", "ckpt_path=null", "data.batch_size=x(", "-m"]) == [
        "input=a.jpg,b.jpg",
        "ckpt_path=null",
        "data.batch_size=x(",
        "-m",
    ]
    assert quote_paths([r"data.root=C:\it's\\"]) == [r"data.root='C:\it\'s\\\\'"]


def test_predict_skips_earlier_drawings_and_reports_broken_links(
    tiny_run: dict, tmp_path: Path
) -> None:
    """A folder predicted into once, then predicted again into another output dir, does not
    detect on its own drawings; a broken link among the photos is listed as skipped, naming
    the link, not silently left out."""
    model = tiny_run["dir"] / "ssd_resnet34_best.pt"
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(PED).convert("RGB").save(photos / "street.jpg")
    (photos / "gone.jpg").symlink_to(photos / "deleted.jpg")
    first = predict(model, photos, photos)  # the drawings land beside the photos
    assert [Path(r["file"]).name for r in first["images"]] == ["street.jpg"]
    assert (photos / "street_pred.jpg").is_file()
    assert [Path(s["file"]).name for s in first["skipped"]] == ["gone.jpg"]
    assert "deleted.jpg, which does not exist" in first["skipped"][0]["error"]
    second = predict(model, photos, photos / "out")
    assert [Path(r["file"]).name for r in second["images"]] == ["street.jpg"]
    assert sorted(p.name for p in (photos / "out").iterdir()) == [
        "detections.json",
        "street_pred.jpg",
    ]
    with pytest.raises(InputError, match="deleted.jpg, which does not exist"):
        predict(model, photos / "gone.jpg", tmp_path / "out3")


def test_a_path_given_as_null_or_a_list_is_one_message(tiny_run: dict, tmp_path: Path) -> None:
    """input=null, input=[a,b], ckpt_path=null and draw=maybe on the command line: one message
    naming the key, exit status 2, no traceback."""
    model = tiny_run["dir"] / "ssd_resnet34_best.pt"
    cases = (
        ([f"ckpt_path={model}", f"input=[{PED},{PED}]"], "input=["),
        ([f"ckpt_path={model}", "input=null"], "input=None"),
        (["ckpt_path=null", f"input={PED}"], "ckpt_path=None: give one file"),
        ([f"ckpt_path={model}", f"input={PED}", "draw=maybe"], "draw='maybe': allowed values"),
    )
    args, key = cases[0]
    r = run_cli("ssd_lightning.predict", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert key in r.stderr
    for args, key in cases[1:]:  # the same path in-process (one start-up is enough)
        cfg = make_cfg([*args, f"output_dir={tmp_path / 'out'}"], tmp_path / "run", "predict")
        with pytest.raises((InputError, CheckpointError), match=re.escape(key)):
            predict_task(cfg)
    assert not (tmp_path / "out" / "detections.json").exists()


def test_evaluate_checks_its_thresholds_and_output_first(tiny_run: dict, tmp_path: Path) -> None:
    """model.evaluate.* out of range and an output that cannot be written: one message naming
    the key, exit status 2, before any image is evaluated."""
    model = f"ckpt_path={tiny_run['dir'] / 'ssd_resnet34_best.pt'}"
    photo = tmp_path / "photo.png"  # a photo given as output by mistake stays as it is
    shutil.copy(PED, photo)
    cases = (
        ("model.evaluate.score_threshold=2", "model.evaluate.score_threshold=2: allowed values"),
        ("model.evaluate.top_k=0", "model.evaluate.top_k=0: allowed values"),
        (f"output={tmp_path}", f"output={tmp_path}: is a folder"),
        (f"output={photo}", f"output={photo}: an existing file that is not .json"),
    )
    r = run_cli("ssd_lightning.evaluate", model, cases[0][0], f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert cases[0][1] in r.stderr and "COCO bbox metrics" not in r.stdout
    for arg, message in cases[1:]:  # the same path in-process (one start-up is enough)
        cfg = make_cfg([model, arg], tmp_path / "e", "evaluate")
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate(cfg, show=lambda text: pytest.fail(f"evaluated: {text}"))
    assert photo.read_bytes() == PED.read_bytes()
