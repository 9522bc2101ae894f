"""A trained model's classes against a dataset's. The names travel with the model; the labels
are numbers each dataset gives its classes (a COCO file: in ascending category id order), so
another export of the same classes may number them otherwise. Classes are matched by name:

- the same names in the same order: nothing to do;
- every class of the data is a class of the model, at other labels (another export, or a model
  with a class more): the data is renumbered as the model's, the mapping logged;
- other names, none of them a class of the other side at another label (renamed classes, e.g. a
  pedestrian model on data that calls them person): matched by label, with a warning;
- anything else (a name of both at different labels, or more classes in the data than the model
  has) cannot be scored or trained as the model's: one message naming both lists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ssd_lightning.config.errors import ConfigError
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
    if len(set(m)) == len(m) and len(set(d)) == len(d) and set(d) <= set(m):
        labels = [0, *(m.index(n) + 1 for n in d)]
        moved = [f"{n} {k} -> {labels[k]}" for k, n in enumerate(d, start=1) if labels[k] != k]
        if moved:
            log.info(
                "%s: the data's classes matched to the model's by name (label here -> model's): %s",
                source,
                ", ".join(moved),
            )
        if len(m) > len(d):
            extra = ", ".join(n for n in m if n not in d)
            log.info("%s: the model's classes without data here: %s", source, extra)
        return labels if moved or len(m) > len(d) else None
    if len(m) != len(d):
        missing = ", ".join(n for n in d if n not in m)
        raise ConfigError(
            f"{source}: the model has {len(m)} class(es) but the data has {len(d)}: {both}"
            + (f"; the model has no {missing}" if missing else "")
        )
    clash = [n for k, n in enumerate(d) if n != m[k] and n in m] + [
        n for k, n in enumerate(m) if n != d[k] and n in d
    ]
    if clash:
        raise ConfigError(
            f"{source}: {both} share {', '.join(dict.fromkeys(clash))} at other labels, so they "
            "match neither by name nor by label; give the data's categories the model's names"
        )
    log.warning("%s: %s differ in name; matched by label", source, both)
    return None


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
