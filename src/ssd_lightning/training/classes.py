"""A trained model's classes against a dataset's. The names travel with the model; the labels
are numbers each dataset gives its classes (a COCO file: in ascending category id order), so
another export of the same classes may number them otherwise. Classes are matched as
``data.class_match`` says (by name, else by label for a renamed class, e.g. a pedestrian model on
data that calls them person, with a warning):

- the same names in the same order: nothing to do;
- each class of the data matched (another export, or a model with a class more): the data is
  renumbered as the model's, the mapping logged;
- a class of the data matched neither way (more classes in the data than the model has, or a
  name of both at different labels taking its label) cannot be scored or trained as the
  model's: one message naming both lists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.data.class_match import match_classes
from ssd_lightning.data.datamodule import DetectionDataModule

log = logging.getLogger(__name__)


def model_labels(model: Sequence[str], data: Sequence[str], source: str) -> list[int] | None:
    """The model's label of each of the data's labels (index = data label, [0] = 0, the
    background) where the data must be renumbered; None where its labels are the model's
    already. ``model`` / ``data``: class names, index = label, [0] = background. ConfigError
    (``source``: what the model is, e.g. ``ckpt_path=<file>``) where no match is sound."""
    m, d = list(model[1:]), list(data[1:])
    if m == d:
        return None
    both = f"the model's classes ({', '.join(m)}) and the data's ({', '.join(d)})"
    data_labels = range(1, len(d) + 1)
    label_of, by_label = match_classes(data_labels, d, range(1, len(m) + 1), m)
    moved = [f"{d[k - 1]} {k} -> {label_of[k]}" for k in data_labels if label_of.get(k, k) != k]
    unmatched = [d[k - 1] for k in data_labels if k not in label_of]
    if unmatched and len(d) > len(m):
        missing = ", ".join(n for n in d if n not in m)
        raise ConfigError(
            f"{source}: the model has {len(m)} class(es) but the data has {len(d)}: {both}"
            + (f"; the model has no {missing}" if missing else "")
        )
    if unmatched:  # its label is another class's, matched by name
        clash = ", ".join(s.split(" ")[0] for s in moved)
        verb = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(
            f"{source}: {both} share {clash} at other labels, so {', '.join(unmatched)} {verb} "
            "neither by name nor by label; give the data's categories the model's names"
        )
    if by_label:
        renamed = ", ".join(f"{d[k - 1]} as {m[label_of[k] - 1]}" for k in by_label)
        log.warning("%s: %s differ in name; matched by label: %s", source, both, renamed)
    if moved:
        log.info(
            "%s: the data's classes matched to the model's by name (label here -> model's): %s",
            source,
            ", ".join(moved),
        )
    if len(m) > len(d):
        extra = ", ".join(m[k - 1] for k in range(1, len(m) + 1) if k not in label_of.values())
        log.info("%s: the model's classes without data here: %s", source, extra)
    return [0, *(label_of[k] for k in data_labels)] if moved or len(m) > len(d) else None


def use_model_classes(datamodule: DetectionDataModule, model: Sequence[str], source: str) -> None:
    """Renumber ``datamodule``'s classes as ``model``'s where they differ (``model_labels``);
    before its ``setup``."""
    labels = model_labels(model, datamodule.class_names, source)
    if labels is not None:
        try:
            datamodule.relabel(labels, model)
        except ValueError as e:
            raise ConfigError(
                f"{source}: the data's classes are the model's at other labels, but {e}"
            ) from None
