"""Faults and bad input end in one clear message (or a documented skip), never a traceback, and a
bad sweep job does not take the sweep down. Real files, real runs on tiny settings."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PENNFUDAN, make_cfg, run_cli, tiny
from PIL import Image

from ssd_lightning.config.compose import instantiate_checked
from ssd_lightning.config.errors import DataError
from ssd_lightning.config.paths import load_option
from ssd_lightning.core.ssd import SSD
from ssd_lightning.data.convert import pennfudan_to_coco
from ssd_lightning.data.dataset import DatasetReadError, PennFudanDataset
from ssd_lightning.data.images import InputError, read_rgb
from ssd_lightning.data.manifest import mask_name
from ssd_lightning.predict import predict
from ssd_lightning.tools.summarize import FAILED, OK, find_jobs
from ssd_lightning.training.checkpoint import export_model

NAMES = ["FudanPed00001.png", "FudanPed00002.png", "PennPed00010.png"]


def _copy_root(dest: Path, names: list[str] = NAMES) -> Path:
    """A Penn-Fudan-layout folder with a few real images and their masks."""
    for sub, files in (("PNGImages", names), ("PedMasks", [mask_name(n) for n in names])):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(PENNFUDAN / sub / f, dest / sub / f)
    return dest


def _clean_failure(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr[-3000:])


# -- sweeps ----------------------------------------------------------------------------------------
def test_a_bad_sweep_job_is_failed_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = run_cli(
        "ssd_lightning.train",
        "-m",  # on the default preset (fitted pairs): ratios build on the preset behind it
        "anchors.ratios=[-1],[0.5]",
        *tiny(trainer__limit_train_batches=1),
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode != 0 and "anchors.ratios" in r.stderr
    status = json.loads((sweep / "0" / "job_status.json").read_text())
    assert status["status"] == "FAILED" and "anchors.ratios" in status["error"]
    assert (sweep / "1" / "metrics.json").is_file()  # the next job ran
    assert json.loads((sweep / "1" / "job_status.json").read_text())["status"] == "COMPLETED"
    jobs = {j.name: j for j in find_jobs(sweep)}
    assert jobs["0"].status == FAILED and jobs["1"].status == OK
    # summarize shows the actual error line, not the header of the message
    assert jobs["0"].note.startswith("anchors.ratios: every value must be a finite number > 0")


# -- data ------------------------------------------------------------------------------------------
def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    root = _copy_root(tmp_path / "root", NAMES[:1])
    png = root / "PNGImages" / NAMES[0]
    gray8 = np.array(Image.open(png).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(png)  # the same picture in 16 bits
    assert Image.open(png).mode.startswith("I")
    image, _ = PennFudanDataset(root).raw(0)
    assert torch.equal(image[0], torch.from_numpy(gray8))  # not all-white
    assert torch.equal(image, read_rgb(png))  # one reader for the dataset and predict


def test_a_dark_16_bit_image_stays_dark(tmp_path: Path) -> None:
    """A 16-bit picture whose values all stay below 256 is nearly black, not an 8-bit one; a
    float image of [0, 1] is scaled from 1.0."""
    dark = tmp_path / "dark.png"
    Image.fromarray(np.arange(0, 250, dtype=np.uint16).reshape(10, 25)).save(dark)
    assert Image.open(dark).mode == "I;16"
    assert read_rgb(dark).max() <= 1
    unit = tmp_path / "unit.tif"
    Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)).save(unit)
    image = read_rgb(unit)
    assert image.min() == 0 and image.max() == 255


def test_a_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    root = _copy_root(tmp_path / "root", NAMES[:1])
    mask = root / "PedMasks" / mask_name(NAMES[0])
    small = Image.open(mask)
    small.resize((small.width // 2, small.height // 2), Image.NEAREST).save(mask)
    with pytest.raises(DatasetReadError, match=rf"{mask_name(NAMES[0])} is .* but image"):
        PennFudanDataset(root).raw(0)
    # where boxes come from the masks and the image headers alone: the anchor tool, the COCO
    # conversion
    with pytest.raises(DatasetReadError, match=rf"{mask_name(NAMES[0])} is .* but image"):
        pennfudan_to_coco(root, NAMES[:1])
    cfg = make_cfg(tiny(f"data.root={root}", "data.split=null", "data.verify=none"), tmp_path)
    with pytest.raises(DatasetReadError, match=rf"{mask_name(NAMES[0])} is .* but image"):
        instantiate_checked(cfg.data, "data").training_boxes()


def test_start_up_checks_of_the_split(tmp_path: Path) -> None:
    r = run_cli(
        "ssd_lightning.train", *tiny("data.val_size=170"), f"hydra.run.dir={tmp_path / 'a'}"
    )
    _clean_failure(r, "data.val_size=170", "0 (no validation) to 169")
    broken = tmp_path / "split.json"
    broken.write_text('{"order": [')
    r = run_cli(
        "ssd_lightning.train", *tiny(f"data.split={broken}"), f"hydra.run.dir={tmp_path / 'b'}"
    )
    _clean_failure(r, str(broken), "not valid JSON")
    # valid JSON, but no split: null once read as "no split" (validating on the training images)
    for text in ("null", "[]", '"abc"'):
        broken.write_text(text)
        with pytest.raises(DataError, match=f"{broken}: not a manifest or split file"):
            instantiate_checked(make_cfg(tiny(f"data.split={broken}"), tmp_path / "c").data, "data")
    with pytest.raises(DataError, match=f"{tmp_path}: a folder, not a JSON file"):
        instantiate_checked(make_cfg(tiny(f"data.split={tmp_path}"), tmp_path / "c").data, "data")


def test_a_worker_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    # the whole dataset (links), a third of its images cut short (the header reads, the pixels
    # not). The validation loader's workers are still up from the sanity check when a training
    # worker fails: the process must exit all the same (workers ignore SIGTERM, which is how
    # multiprocessing stops them at exit)
    root = tmp_path / "root"
    for sub in ("PNGImages", "PedMasks"):
        (root / sub).mkdir(parents=True)
        for i, f in enumerate(sorted((PENNFUDAN / sub).glob("*.png"))):
            if sub == "PNGImages" and i % 3 == 1:
                (root / sub / f.name).write_bytes(f.read_bytes()[:20000])
            else:
                (root / sub / f.name).symlink_to(f)
    r = run_cli(
        "ssd_lightning.train",
        *tiny(
            data__num_workers=2,
            data__preload="false",
            data__verify="none",
            data__root=str(root),
            trainer__limit_train_batches=10,
            trainer__num_sanity_val_steps=2,
        ),
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    _clean_failure(r, "Data error", "image file is truncated")
    bad = r.stderr.split("PNGImages/")[1].split(":")[0]
    assert "Original Traceback" not in r.stderr and "worker process" not in r.stderr
    # a run that fails during the fit says so in its records (summarize, schedulers)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and bad in metrics["error"]
    status = json.loads((tmp_path / "run" / "job_status.json").read_text())
    assert status["status"] == "FAILED" and bad in status["error"]


def test_evaluate_downloads_when_asked(tmp_path: Path) -> None:
    archive = tmp_path / "PennFudanPed.zip"
    src = _copy_root(tmp_path / "src" / "PennFudanPed")
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f.relative_to(src.parent))
    model = tmp_path / "model.pt"
    export_model(SSD(load_option("anchors", "tall_skinny"), image_size=128, weights="none"), model)
    out = tmp_path / "eval"
    r = run_cli(
        "ssd_lightning.evaluate",
        f"ckpt_path={model}",
        f"data.root={tmp_path / 'fetched'}",
        "data.download=true",
        f"data.download_url={archive.as_uri()}",
        "data.split=null",
        "data.verify=none",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "fetched" / "PNGImages" / NAMES[0]).is_file()
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["split"].startswith("all images of")
    assert f"COCO bbox metrics, 3 images (all images of {tmp_path / 'fetched'})" in r.stdout


# -- predict ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = SSD(load_option("anchors", "tall_skinny"), image_size=128, weights="none")
    return export_model(net, tmp_path_factory.mktemp("model") / "model.pt")


def test_predict_skips_a_decompression_bomb(model_file: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PENNFUDAN / "PNGImages" / NAMES[0], photos / "person.png")
    # 14000 x 14000 px of one colour: small on disk, over twice PIL's pixel limit in memory
    Image.new("L", (14000, 14000)).save(photos / "bomb.png", optimize=True)
    result = predict(model_file, photos, tmp_path / "out", score_threshold=0.0, top_k=1)
    assert [Path(r["file"]).name for r in result["images"]] == ["person.png"]
    assert [Path(s["file"]).name for s in result["skipped"]] == ["bomb.png"]
    assert "too large" in result["skipped"][0]["error"]
    with pytest.raises(InputError, match="bomb.png"):
        read_rgb(photos / "bomb.png")


def test_predict_bad_settings_are_one_message(model_file: Path, tmp_path: Path) -> None:
    photo = PENNFUDAN / "PNGImages" / NAMES[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for kwargs, match in (
        ({"output_dir": a_file}, "output_dir=.*is a file"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"device": "tpu"}, "device='tpu'"),
    ):
        args = {"output_dir": tmp_path / "out", **kwargs}
        with pytest.raises(InputError, match=match):
            predict(model_file, photo, **args)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            predict(model_file, photo, tmp_path / "out", device="cuda")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="not writable"):
            predict(model_file, photo, locked)
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={model_file}",
        f"input={photo}",
        f"output_dir={a_file}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    _clean_failure(r, "is a file")
    r = run_cli(
        "ssd_lightning.predict",
        f"ckpt_path={model_file}",
        f"input={photo}",
        "batch_size=-1",
        f"hydra.run.dir={tmp_path / 'run2'}",
    )
    _clean_failure(r, "batch_size=-1")


def test_predict_into_its_input_folder_twice(model_file: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in NAMES[:2]:
        shutil.copy(PENNFUDAN / "PNGImages" / n, photos / n)
    first = predict(model_file, photos, photos, score_threshold=0.0, top_k=1)
    assert len(first["images"]) == 2 and len(list(photos.glob("*_pred.png"))) == 2
    again = predict(model_file, photos, photos, score_threshold=0.0, top_k=1)
    assert sorted(Path(r["file"]).name for r in again["images"]) == sorted(NAMES[:2])
    assert len(list(photos.glob("*_pred*.png"))) == 2  # no *_pred_pred.png
