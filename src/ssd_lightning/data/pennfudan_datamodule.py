"""`PennFudanDataModule`: the vendored Penn-Fudan (verified against its manifest, or downloaded
into another root) with the committed train / val split, on `DetectionDataModule`'s loaders
(the batch format is described there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssd_lightning.config.paths import data_dir
from ssd_lightning.data.datamodule import DetectionDataModule, check_choice, check_int
from ssd_lightning.data.dataset import PennFudanDataset, header_boxes
from ssd_lightning.data.download import URL, download_pennfudan
from ssd_lightning.data.manifest import (
    IMAGE_DIR,
    MASK_DIR,
    list_image_names,
    load_json,
    mask_name,
    split_names,
    verify_dataset,
)
from ssd_lightning.data.presets import needs_masks

_VERIFY = ("quick", "full", "none")


class PennFudanDataModule(DetectionDataModule):
    """Penn-Fudan train/val/test loaders from the committed split.

    val_size: 50 = the committed validation list; 0 = no validation, all 170 images train (the
    original design; `val_dataloader()` returns [] and Lightning skips validation, the test set
    is then all 170 images); other values take the first `val_size` names of the split file's
    seeded order, so a smaller set is a subset of the committed 50.
    root, manifest, split: the dataset folder, its manifest and split file. With ``root`` None
    all three default to the vendored dataset (data/); otherwise a ``split`` of None means every
    image under `root` (another dataset in the Penn-Fudan layout, e.g. for evaluation:
    `data.root=<dir> data.split=null data.verify=none`).
    verify: quick (names + sizes) | full (sha256) | none. download: fetch the official archive
    into `root` if it is missing (offline this fails within `download_timeout` seconds).
    num_classes: checked against Penn-Fudan's (2, with the background). ``options``: the
    loader and augmentation arguments, see ``DetectionDataModule``.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        manifest: str | Path | None = None,
        split: str | Path | None = None,
        val_size: int = 50,
        verify: str = "quick",
        download: bool = False,
        download_url: str = URL,
        download_sha256: str | None = None,
        download_timeout: float = 5.0,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        self.verify = check_choice("data.verify", verify, _VERIFY)
        check_int("val_size", val_size, 0)
        super().__init__(**options)
        self._check_num_classes(num_classes, self.class_names, "Penn-Fudan")
        if root is None:  # the vendored dataset
            root = data_dir() / "PennFudanPed"
            manifest = manifest or data_dir() / "pennfudan_manifest.json"
            split = split or data_dir() / "pennfudan_split.json"
        self.root = Path(root)
        self.manifest = None if manifest is None else Path(manifest)
        self.split = None if split is None else Path(split)
        self.val_size = val_size
        self.download = bool(download)
        self.download_url, self.download_sha256 = download_url, download_sha256
        self.download_timeout = float(download_timeout)
        # a split file that cannot give val_size images fails here, before the model is built
        self._split = None if self.split is None else load_json(self.split)
        if self._split is not None:
            split_names(self._split, self.val_size)
        self._verified = False

    # -- data on disk -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and not (self.root / "PNGImages").is_dir():
            download_pennfudan(
                self.root, self.download_url, self.download_sha256, self.download_timeout
            )
        self._verify()

    def _verify(self) -> None:
        if not self._verified and self.verify != "none":
            if self.manifest is None:
                raise ValueError("data.verify: needs data.manifest (or data.verify=none)")
            verify_dataset(self.root, self.manifest, full=self.verify == "full")
        self._verified = True

    def _names(self) -> tuple[list[str], list[str]]:
        """(train, val) file names."""
        if self._split is None:  # another dataset root: every image is evaluated
            names = list_image_names(self.root)
            return names, names
        return split_names(self._split, self.val_size)

    # -- datasets -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets `stage` needs (all for None): evaluating decodes no training set."""
        self._verify()
        train_names, val_names = self._names()
        if stage in (None, "fit") and self.train_set is None:
            if self._split is None:
                warnings.warn(
                    f"data.split=null: training and validating on every image under {self.root}",
                    stacklevel=2,
                )
            self.train_set = self._dataset(train_names, self.train_transform, self.fallbacks, True)
        if self.val_set is None and val_names:
            self.val_set = self._dataset(val_names, self.eval_transform)
        self._set_test_set(lambda: self._dataset(train_names, self.eval_transform))

    def _dataset(
        self,
        names: list[str],
        transform: Callable,
        fallbacks: list | None = None,
        train: bool = False,
    ) -> PennFudanDataset:
        # only the augmented training boxes are recomputed from the masks
        masks = train and needs_masks(self.augmentation)
        ds = PennFudanDataset(
            self.root, names, transform, fallbacks or [], skip_empty=train, with_masks=masks
        )
        return self._preloaded(ds)

    def training_boxes(self) -> Tensor:
        """GT boxes of the training split, (G, 4) xyxy normalized to their image (read from the
        mask files and the image headers: no pixel decode)."""
        train = self._names()[0]
        out = []
        for name in train:
            boxes, (h, w) = header_boxes(
                self.root / IMAGE_DIR / name, self.root / MASK_DIR / mask_name(name)
            )
            out.append(boxes / torch.tensor([w, h, w, h], dtype=torch.float32))
        return torch.cat(out)

    def split_description(self, use_val: bool) -> str:
        if self._split is None:
            return f"all images of {self.root}"
        return super().split_description(use_val)
