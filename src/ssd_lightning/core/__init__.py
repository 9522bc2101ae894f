"""The detector in plain PyTorch: no Lightning, no Hydra.

Read in this order: anchors -> backbone (norm) -> heads -> ssd -> box_coding -> matching -> loss ->
step -> postprocess. ``plain`` turns config values into plain Python for them.
"""

from ssd_lightning.core.loss import LossOutput, MultiBoxLoss
from ssd_lightning.core.postprocess import (
    EVALUATE_DEFAULTS,
    PREDICT_DEFAULTS,
    postprocess,
    select_detections,
)
from ssd_lightning.core.ssd import SSD
from ssd_lightning.core.step import forward_with_loss

__all__ = [
    "EVALUATE_DEFAULTS",
    "PREDICT_DEFAULTS",
    "SSD",
    "LossOutput",
    "MultiBoxLoss",
    "forward_with_loss",
    "postprocess",
    "select_detections",
]
