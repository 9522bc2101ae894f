"""Vendored Penn-Fudan: manifest, committed split, PennFudanDataset, download safety."""

from __future__ import annotations

import json
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MANIFEST, PENNFUDAN, SPLIT, one_error_line, run_cli
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from ssd_lightning.data import download as dl
from ssd_lightning.data.dataset import DatasetReadError, PennFudanDataset
from ssd_lightning.data.manifest import (
    DatasetIntegrityError,
    build_manifest,
    build_split,
    list_image_names,
    load_json,
    split_names,
    verify_dataset,
)
from ssd_lightning.data.mask_runs import MaskRuns, visible_boxes


@pytest.fixture(scope="module")
def full_ds() -> PennFudanDataset:
    return PennFudanDataset(PENNFUDAN)


def _write_sample(
    root: Path, name: str, image: Image.Image, boxes: list[tuple[int, int, int, int]]
):
    (root / "PNGImages").mkdir(parents=True, exist_ok=True)
    (root / "PedMasks").mkdir(parents=True, exist_ok=True)
    image.save(root / "PNGImages" / name)
    mask = np.zeros((image.height, image.width), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes, start=1):  # inclusive pixel coords
        mask[y1 : y2 + 1, x1 : x2 + 1] = i
    Image.fromarray(mask).save(root / "PedMasks" / name.replace(".png", "_mask.png"))


# -- manifest ------------------------------------------------------------------------------------
def test_manifest_covers_images_and_masks_and_quick_check_passes():
    man = load_json(MANIFEST)
    assert man["num_images"] == 170 and len(man["files"]) == 340
    assert verify_dataset(PENNFUDAN, man) == 340


def test_full_sha256_check_passes():
    assert verify_dataset(PENNFUDAN, MANIFEST, full=True) == 340


def test_manifest_errors_name_the_file_and_the_fix(tmp_path):
    _write_sample(tmp_path, "A.png", Image.new("RGB", (20, 10)), [(1, 1, 5, 5)])
    _write_sample(tmp_path, "B.png", Image.new("RGB", (20, 10)), [(1, 1, 5, 5)])
    man = build_manifest(tmp_path)
    assert verify_dataset(tmp_path, man, full=True) == 4
    (tmp_path / "PNGImages" / "A.png").unlink()
    with (tmp_path / "PedMasks" / "B_mask.png").open("ab") as f:
        f.write(b"x")
    with pytest.raises(DatasetIntegrityError) as e:
        verify_dataset(tmp_path, man)
    msg = str(e.value)
    assert "A.png" in msg and "missing" in msg and "B_mask.png" in msg and "git checkout" in msg
    # a root of the user's own (data.root=<folder>) is told how to read it unchecked
    assert "data.verify=none data.split=null" in msg
    # same size, different bytes: only the full check sees it
    p = tmp_path / "PedMasks" / "A_mask.png"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    man2 = {"files": [f for f in man["files"] if f["path"] == "PedMasks/A_mask.png"]}
    verify_dataset(tmp_path, man2)
    with pytest.raises(DatasetIntegrityError, match="A_mask.png"):
        verify_dataset(tmp_path, man2, full=True)


# -- split ---------------------------------------------------------------------------------------
def test_committed_split_is_disjoint_complete_and_reproducible():
    split = load_json(SPLIT)
    names = list_image_names(PENNFUDAN)
    assert len(names) == 170 and isinstance(split["seed"], int)
    assert len(split["val"]) == 50 and len(split["train"]) == 120
    assert not set(split["val"]) & set(split["train"])
    assert sorted(split["val"] + split["train"]) == names
    # regenerating with the recorded seed gives the committed file
    assert build_split(names, seed=split["seed"], val_size=50) == split
    train, val = split_names(split)
    assert val == split["val"] and train == split["train"]


def test_other_val_sizes_follow_the_seeded_order():
    train0, val0 = split_names(SPLIT, 0)
    assert val0 == [] and len(train0) == 170
    train10, val10 = split_names(SPLIT, 10)
    assert len(val10) == 10 and set(val10) <= set(load_json(SPLIT)["val"])
    assert len(train10) == 160 and not set(train10) & set(val10)
    with pytest.raises(ValueError, match="val_size"):
        split_names(SPLIT, 170)


# -- dataset -------------------------------------------------------------------------------------
def test_real_dataset_counts_and_boxes(full_ds):
    assert len(full_ds) == 170 and full_ds.empty == []
    total = 0
    for i in range(len(full_ds)):
        img, t = full_ds[i]
        assert isinstance(img, tv_tensors.Image) and img.dtype == torch.uint8 and img.shape[0] == 3
        h, w = img.shape[-2:]
        b = t["boxes"]
        assert (
            isinstance(b, tv_tensors.BoundingBoxes)
            and b.format == tv_tensors.BoundingBoxFormat.XYXY
        )
        assert tuple(b.canvas_size) == (h, w) and t["orig_size"].tolist() == [h, w]
        assert len(b) >= 1 and (t["labels"] == 1).all() and len(t["labels"]) == len(b)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2:] - b[:, :2]) >= 1).all()
        assert t["name"] == full_ds.names[i] and t["fallback"] == 0
        total += len(b)
    assert total == 423


def test_boxes_are_masks_to_boxes_with_exclusive_max(full_ds):
    name = full_ds.names[0]
    mask = torch.from_numpy(np.array(Image.open(full_ds.mask_path(name))))
    ids = mask.unique()[1:]
    ref = masks_to_boxes(mask[None] == ids[:, None, None])
    ref[:, 2:] += 1
    torch.testing.assert_close(full_ds[0][1]["boxes"].as_subclass(torch.Tensor), ref)


def test_instance_masks_on_request():
    """with_masks adds each instance's mask as row runs, in the order of the boxes; samples of a
    dataset without masks stay boxes only."""
    ds = PennFudanDataset(PENNFUDAN, names=["FudanPed00001.png"], with_masks=True)
    img, t = ds[0]
    runs = t["mask_runs"]
    assert isinstance(runs, MaskRuns) and len(runs) == 2 and runs.canvas_size == img.shape[-2:]
    boxes, area = visible_boxes(runs)
    torch.testing.assert_close(boxes, t["boxes"].as_subclass(torch.Tensor))
    mask = torch.from_numpy(np.array(Image.open(ds.mask_path("FudanPed00001.png"))))
    torch.testing.assert_close(area, torch.stack([(mask == k).sum() for k in (1, 2)]).float())
    assert runs is not ds[0][1]["mask_runs"]  # a copy per sample
    assert "mask_runs" not in PennFudanDataset(PENNFUDAN, names=["FudanPed00001.png"])[0][1]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_grayscale_rgba_palette_images_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), np.uint8))
    img = rgb.convert(mode)
    _write_sample(tmp_path, "X.png", img, [(2, 3, 7, 9)])
    im, t = PennFudanDataset(tmp_path)[0]
    assert im.shape == (3, 12, 16) and im.dtype == torch.uint8
    ref = np.asarray(img.convert("RGB"))
    assert np.abs(im.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max() <= 1
    assert t["boxes"].tolist() == [[2.0, 3.0, 8.0, 10.0]]


def test_unreadable_image_or_mask_names_the_file(tmp_path):
    _write_sample(tmp_path, "Good.png", Image.new("RGB", (10, 10)), [(1, 1, 3, 3)])
    _write_sample(tmp_path, "Bad.png", Image.new("RGB", (10, 10)), [(1, 1, 3, 3)])
    (tmp_path / "PNGImages" / "Bad.png").write_bytes(b"not a png")
    ds = PennFudanDataset(tmp_path)
    ds[ds.names.index("Good.png")]  # images are read lazily
    with pytest.raises(DatasetReadError, match=r"image file .*Bad\.png"):
        ds[ds.names.index("Bad.png")]
    (tmp_path / "PedMasks" / "Good_mask.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetReadError, match=r"mask file .*Good_mask\.png"):
        PennFudanDataset(tmp_path)


def test_image_without_instances_is_reported_and_skipped_for_training(tmp_path):
    _write_sample(tmp_path, "Empty.png", Image.new("RGB", (10, 10)), [])
    _write_sample(tmp_path, "Ped.png", Image.new("RGB", (10, 10)), [(1, 1, 3, 3)])
    with pytest.warns(UserWarning, match="Empty.png"):
        train = PennFudanDataset(tmp_path, skip_empty=True)
    assert train.names == ["Ped.png"]
    evaluation = PennFudanDataset(tmp_path)  # evaluation keeps it, with zero boxes
    assert evaluation.names == ["Empty.png", "Ped.png"] and len(evaluation[0][1]["boxes"]) == 0


# -- download ------------------------------------------------------------------------------------
def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path, bad):
    z = _zip(tmp_path / "a.zip", {"ok/file.txt": b"1", bad: b"2"})
    with pytest.raises(dl.DownloadError, match="refusing"):
        dl.safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "out" / "ok").exists()  # nothing written before the check
    assert not (tmp_path / "evil.txt").exists()


def test_download_from_local_archive_with_checksum(tmp_path):
    z = _zip(
        tmp_path / "p.zip",
        {"PennFudanPed/PNGImages/x.png": b"img", "PennFudanPed/readme.txt": b"r"},
    )
    url = z.as_uri()
    root = dl.download_pennfudan(tmp_path / "root", url=url, sha256=dl.sha256_file(z))
    assert (root / "PNGImages" / "x.png").read_bytes() == b"img"
    with pytest.raises(dl.DownloadError, match="checksum mismatch"):
        dl.download_pennfudan(tmp_path / "root2", url=url, sha256="0" * 64)


def test_offline_download_fails_fast_with_clear_message(tmp_path, monkeypatch):
    def hanging_dns(*args, **kwargs):  # an offline resolver that never answers
        time.sleep(30)

    monkeypatch.setattr(socket, "getaddrinfo", hanging_dns)
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match="offline") as e:
        dl.download_pennfudan(tmp_path / "root", timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert str(tmp_path / "root") in str(e.value)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(dl.DownloadError, match="offline"):
        dl.download_pennfudan(tmp_path / "root", timeout=0.5)


def test_manifest_cli_check(capsys):
    from ssd_lightning.data.manifest import main

    main(["--root", str(PENNFUDAN)])
    assert "340 files OK" in capsys.readouterr().out
    assert json.loads(MANIFEST.read_text())["dataset"] == "PennFudanPed"


def test_manifest_cli_mistake_is_one_message_and_exit_status_2(tmp_path):
    r = run_cli("ssd_lightning.data.manifest", "--root", str(tmp_path / "nowhere"))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "nowhere" in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()][0].startswith("Data error:")
    r = run_cli("ssd_lightning.data.manifest", "--bogus")
    assert "--bogus" in one_error_line(r) and "usage:" not in r.stderr, r.stderr
