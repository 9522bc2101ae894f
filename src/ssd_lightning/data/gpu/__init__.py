"""The GPU data path: the CPU draws the augmentation parameters, the device does the pixel work.

On a GPU the network consumes images faster than CPU workers can crop, resize and colour-jitter
them. This package keeps the augmentation *semantics* of the CPU pipeline (``data.presets``) and
moves only the pixels, in three stages, one module each:

1. ``record``: ``ImageMeta``, a pixel-less ``tv_tensors.Image`` whose kernels (registered with
   ``torchvision.transforms.v2.functional.register_kernel``) only *record* the pixel operations
   they are asked for (crop, resized_crop, horizontal_flip, resize, the photometric adjustments,
   to_dtype). Every ``make_params``, every box operation, the instance masks' row runs behind
   the tight boxes (``data.mask_runs``), ``SanitizeBoundingBoxes`` and the dataset's empty-box
   fallback run unchanged, in the same order, on torch's global generator - so for the same seed
   the boxes are *identical* to the CPU path's.
2. ``plan``: the record compiled into a ``PixelPlan`` (source rectangle, flip, photometric factors
   in RandomPhotometricDistort's fixed order) by ``GpuPlanDataset``, the dataset the DataLoader's
   CPU workers run; ``data.batch.plan_collate`` stacks plans into a ``PlanBatch``.
3. ``pixels``: ``GpuAugmenter`` holds the decoded images on the device as one padded tensor and
   makes a whole batch with one ``roi_align`` (crop + antialiased resize) plus batched flip and
   photometric tensor ops; the DataModule calls it in ``on_after_batch_transfer``.

Differences to the CPU reference, by design and small: the CPU path works on uint8 (truncating
after every photometric op) and resizes with torchvision's antialiased bilinear filter; the GPU
path works in float with roi_align's box-averaged bilinear samples (tests/test_gpu_augment.py
bounds the difference). Steps without a recording kernel (e.g. RandomZoomOut's padding) make the
DataModule fall back to the CPU path.
"""
