"""Training with Lightning around the plain-PyTorch core.

- ``lit_module``   the LightningModule (a thin shell over ``core``)
- ``schedules``    learning-rate schedules
- ``ema``          the moving average of the weights, the network validated and exported
- ``callbacks``    prediction images and figures, augmentation preview, the best model, last.ckpt
- ``checkpoint``   the one reader (and writer) of .ckpt / .pt model files; imports no Lightning
- ``checkpoint_io`` how Lightning writes (atomically) and reads (weights-only) checkpoints
- ``resume``       resume= / ckpt_path=: the checks before a resume, no silent reuse of a run dir
- ``run_outputs``  what a run leaves besides checkpoints: metrics.json, TensorBoard HPARAMS
- ``progress``     the bar on a terminal, one line per epoch anywhere else
- ``signals``      SIGTERM / SIGINT stop a run at a batch, every DDP rank at the same one
- ``epoch_sums``   a stopped epoch's running sums of its logged averages, added back on resume
- ``classes``      a model's classes against a dataset's (matched by name)
- ``builders``     a composed config -> (module, datamodule, trainer)
"""
