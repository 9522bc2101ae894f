"""`CocoDataModule`: a COCO-format dataset (``images_dir`` + ``train_json`` [+ ``val_json``]) with
everything `DetectionDataModule` gives (augmentation presets, the empty-box fallback, the seeded
training stream, the GPU data path).

Without ``val_json`` the validation images are a seeded split of ``train_json``, recorded like
Penn-Fudan's committed split (``manifest.build_split``) in ``split_file``: read when it exists,
written otherwise, so every run of the dataset validates on the same images. Another
``split_seed`` is another split, recorded in its own file (``<stem>_split_seed<N>.json``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssd_lightning.config.atomic import write_json
from ssd_lightning.config.errors import ConfigError
from ssd_lightning.data.coco import CocoAnnotations, CocoFormatError, read_coco
from ssd_lightning.data.coco_dataset import CocoDataset
from ssd_lightning.data.datamodule import DetectionDataModule, check_int
from ssd_lightning.data.manifest import build_split, load_json, split_names
from ssd_lightning.data.presets import needs_masks

log = logging.getLogger(__name__)

SPLIT_SEED = 20240601  # Penn-Fudan's


class CocoDataModule(DetectionDataModule):
    """COCO train/val/test loaders.

    images_dir: the folder the ``file_name`` entries are relative to. train_json / val_json: the
    annotation files (``val_json`` null: a seeded split of ``train_json``). val_images_dir: the
    folder of ``val_json``'s images when it is another (an export with a folder per subset;
    null = ``images_dir``). val_size: images the
    split holds out: a count, or a fraction in (0, 1); 0 = no validation. split_seed: the split's
    seed. split_file: where the split is recorded (null = ``<train_json stem>_split.json`` beside
    it; ``<train_json stem>_split_seed<N>.json`` for a split_seed other than the default).
    num_classes: checked against the categories + background. ``options``: the loader and
    augmentation arguments, see ``DetectionDataModule``.
    """

    def __init__(
        self,
        images_dir: str | Path,
        train_json: str | Path,
        val_json: str | Path | None = None,
        val_size: int | float = 0.2,
        split_seed: int = SPLIT_SEED,
        split_file: str | Path | None = None,
        num_classes: int | None = None,
        val_images_dir: str | Path | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if isinstance(val_size, float):
            if not 0 < val_size < 1:
                raise ValueError(
                    f"data.val_size={val_size!r}: allowed values are a fraction in (0, 1) or an "
                    "image count >= 0"
                )
        else:
            check_int("val_size", val_size, 0)
        check_int("split_seed", split_seed, 0)
        self.root = Path(images_dir).expanduser()
        self.train_json = Path(train_json).expanduser()
        self.val_json = None if val_json is None else Path(val_json).expanduser()
        self.val_size, self.split_seed = val_size, split_seed
        # a sweep over split_seed gets one recorded split per seed, never the first one again
        suffix = "" if split_seed == SPLIT_SEED else f"_seed{split_seed}"
        self.split_file = (
            self.train_json.with_name(f"{self.train_json.stem}_split{suffix}.json")
            if split_file is None
            else Path(split_file).expanduser()
        )
        # read and checked now: a bad file fails at start-up, and the classes are known
        self.train_ann: CocoAnnotations = read_coco(self.train_json, self.root)
        self.val_ann: CocoAnnotations | None = None
        if self.val_json is not None:
            val_root = self.root if val_images_dir is None else Path(val_images_dir).expanduser()
            self.val_ann = read_coco(
                self.val_json, val_root, self.train_ann, "data.val_json", "data.val_images_dir"
            )
        self._check_num_classes(num_classes, self.class_names, str(self.train_json))
        self._split: dict[str, Any] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.train_ann.class_names)

    def relabel(self, labels: Sequence[int], class_names: Sequence[str]) -> None:
        """Renumber both files' classes as a model's (see the base); a class of the model's
        without a category here gets no category id."""
        if any(s is not None for s in (self.train_set, self.val_set, self.test_set)):
            raise RuntimeError("relabel: the datasets are built already (call it before setup)")
        table = torch.tensor(labels, dtype=torch.int64)
        for ann in (self.train_ann, self.val_ann):
            if ann is None:
                continue
            for image in ann.images:
                image.labels = table[image.labels]
            ids: list[int | None] = [None] * (len(class_names) - 1)
            for k, c in enumerate(ann.category_ids, start=1):
                ids[labels[k] - 1] = c
            ann.category_ids, ann.class_names = ids, list(class_names)

    # -- the split ------------------------------------------------------------------------------
    def _held_out(self, n: int) -> int:
        # a fraction holds out at least one image; a ConfigError (not a bare ValueError): the
        # data is only read once the tool runs, where it must still be one message
        fraction = isinstance(self.val_size, float)
        k = max(round(self.val_size * n), 1) if fraction else int(self.val_size)
        if not 0 <= k < n:
            allowed = f"an integer 0 to {n - 1}, or a fraction" if n > 1 else "0"
            raise ConfigError(
                f"data.val_size={self.val_size}: {self.train_json} has {n} image(s) and at least "
                f"one must train (allowed: {allowed}); or give the validation images as "
                "data.val_json"
            )
        return k

    def _split_names(self) -> tuple[list[str], list[str]]:
        """(train, val) file names of ``train_json`` (val empty with ``val_json``)."""
        names = [e.file_name for e in self.train_ann.images]
        if self.val_json is not None:
            return names, []
        k = self._held_out(len(names))
        if self._split is None:
            if self.split_file.is_file():
                self._split = load_json(self.split_file)
                if sorted(self._split.get("order", [])) != sorted(names):
                    raise CocoFormatError(
                        f"{self.split_file}: the recorded split is of other images than "
                        f"{self.train_json}; delete it (or set data.split_file) to split anew"
                    )
                if self._split.get("seed") != self.split_seed:
                    raise CocoFormatError(
                        f"{self.split_file}: records the split of seed {self._split.get('seed')}, "
                        f"not data.split_seed={self.split_seed}; set data.split_file to another "
                        "file to record that split (or leave it null: one file per seed)"
                    )
            else:
                self._split = build_split(names, seed=self.split_seed, val_size=k)
                self._record_split()
        if k == 0:
            return sorted(names), []
        return split_names(self._split, k)

    def _record_split(self) -> None:
        try:
            # atomic: sweep jobs and DDP ranks that start together read a whole file or none
            write_json(self.split_file, self._split)
            log.info(
                "split of %s (seed %d) recorded in %s",
                self.train_json,
                self.split_seed,
                self.split_file,
            )
        except OSError as e:
            warnings.warn(
                f"data.split_file={self.split_file}: cannot record the split there ({e}); it is "
                f"seeded (data.split_seed={self.split_seed}), so it is the same next time",
                stacklevel=2,
            )

    def _indices(self, names: list[str]) -> list[int]:
        where = {e.file_name: i for i, e in enumerate(self.train_ann.images)}
        return [where[n] for n in names]

    # -- datasets -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets `stage` needs (all for None): evaluating decodes no training set."""
        train_names, val_names = self._split_names()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._preloaded(
                CocoDataset(
                    self.train_ann,
                    self._indices(train_names),
                    self.train_transform,
                    self.fallbacks,
                    train=True,
                    with_masks=needs_masks(self.augmentation),
                )
            )
        if self.val_set is None:
            if self.val_ann is not None:
                self.val_set = self._preloaded(CocoDataset(self.val_ann, None, self.eval_transform))
            elif val_names:
                self.val_set = self._preloaded(
                    CocoDataset(self.train_ann, self._indices(val_names), self.eval_transform)
                )
        self._set_test_set(
            lambda: self._preloaded(
                CocoDataset(self.train_ann, self._indices(train_names), self.eval_transform)
            )
        )

    def training_boxes(self) -> Tensor:
        """GT boxes of the training split (crowd left out), (G, 4) xyxy normalized to their image
        (the annotation file's sizes: no pixel decode)."""
        out = []
        for i in self._indices(self._split_names()[0]):
            e = self.train_ann.images[i]
            size = torch.tensor([e.width, e.height, e.width, e.height], dtype=torch.float32)
            out.append(e.boxes[~e.crowd] / size)
        return torch.cat(out)

    def split_description(self, use_val: bool) -> str:
        if not use_val:
            return f"all of {self.train_json}"
        if self.val_json is not None:
            return str(self.val_json)
        return f"val split of {self.train_json}"
