"""The detector in plain PyTorch: no Lightning, no Hydra.

Read in this order: anchors -> backbone -> heads -> ssd -> box_coding -> matching -> loss
-> postprocess.
"""

from ssd_lightning.core.loss import LossOutput, MultiBoxLoss
from ssd_lightning.core.ssd import SSD, export_model, load_model

__all__ = ["SSD", "LossOutput", "MultiBoxLoss", "export_model", "load_model"]
