"""Training with Lightning around the plain-PyTorch core.

- ``lit_module``   the LightningModule (a thin shell over ``core``)
- ``schedules``    learning-rate schedules
- ``ema``          the moving average of the weights, the network validated and exported
- ``callbacks``    prediction images and figures, augmentation preview, the best model, last.ckpt
- ``checkpoint``   the one reader (and writer) of .ckpt / .pt model files; imports no Lightning
- ``checkpoint_io`` how Lightning writes (atomically) and reads (weights-only) checkpoints
- ``resume``       resume= / ckpt_path=: the checks before a resume, no silent reuse of a run dir
- ``run_outputs``  what a run leaves besides checkpoints: metrics.json, TensorBoard HPARAMS
"""
