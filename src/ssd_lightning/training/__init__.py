"""Training with Lightning around the plain-PyTorch core.

- ``lit_module``   the LightningModule (a thin shell over ``core``)
- ``schedules``    learning-rate schedules
- ``callbacks``    prediction images and figures, augmentation preview, best-model export
- ``checkpoint``   the one reader (and writer) of .ckpt / .pt model files; imports no Lightning
- ``run_outputs``  what a run leaves besides checkpoints: metrics.json, TensorBoard HPARAMS
"""
