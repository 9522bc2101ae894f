"""Throughput benchmark: the project's training step and inference against the bare network and
against torchvision's ``SSD`` class around the same network, the data pipeline, and a short
Lightning fit - in one process, on one device, with one network and one synthetic batch.

Usage (``key=value`` arguments, values parsed as YAML; quote lists for the shell)::

    python -m ssd_lightning.benchmark                                   # CPU: small settings
    python -m ssd_lightning.benchmark device=cuda precision=bf16 'batch_sizes=[32,128]'
    python -m ssd_lightning.benchmark image_size=128 'batch_sizes=[2]' steps=1 warmup=1 \\
        repeats=1 'sections=[bare,step,torchvision,inference]' out=/tmp/bench.json

Options (default on CPU / on CUDA):
    device          cpu | cuda                       (cuda when available)
    batch_sizes     list of ints                     ([2] / [32, 128])
    precision       fp32 | bf16 (autocast)           (fp32 / bf16)
    channels_last   true | false | auto (= on CUDA)  (auto)
    image_size      network input S                  (300)
    steps           timed steps per repeat           (2 / 20)
    warmup          untimed steps before timing      (1 / 10)
    repeats         timed repeats, the median wins   (3 / 5)
    sections        any of bare, step, torchvision, inference, data, fit, or all   (all)
    compile         torch.compile the network for bare/step/inference (false)
    data_samples    samples timed in the data section (60 / 400)
    fit_epochs      epochs of the Lightning fit      (2 / 10)
    fit_batches     train batches per epoch, null = all (3 / null)
    fit_batch_size  data.batch_size of the fit       (the first of batch_sizes)
    fit_overrides   extra Hydra overrides for the fit, a list of strings ([])
    out             JSON path                        (outputs/benchmark/benchmark_<device>.json)
    seed            synthetic batch and init         (0)
    anchors         anchor preset of the network     (tall_skinny)
    augmentation    preset of the data section       (safe_crop)

On CUDA the JSON also lists, per step function, the source lines where one call synchronizes
the host with the device (``sync_sites``, from ``torch.cuda.set_sync_debug_mode``).

Sections (img/s = images per second, medians over ``repeats`` of ``steps`` steps, after
``warmup`` steps, with ``torch.cuda.synchronize`` around every timed region on CUDA):
    1 bare        forward + trivial loss (mean square of loc and logits) + backward + Adam:
                  the ceiling for a training step
    2 step        the project's step: ``core.step.forward_with_loss`` (forward, matching,
                  hard-negative mining: what ``SSDLitModule.training_step`` calls), backward, Adam
    3 torchvision ``torchvision.models.detection.ssd.SSD`` wrapping the SAME backbone and heads
                  (anchors = ours in pixels; its transform at the input size with identity
                  mean/std - our normalization stays in the backbone), training mode: its
                  SSDMatcher, its per-image loss loop, 4:1 mining (positive_fraction 0.2)
    4 inference   eval mode, no grad: bare forward vs ``SSD.detect`` (forward + decode + NMS,
                  predict thresholds 0.5 / 0.45 / top-20; run as forward under autocast +
                  ``postprocess``, which is what ``detect`` does) vs torchvision's SSD eval with
                  the same thresholds. The network is untrained and its scores saturate, so NMS
                  sees the full pre-NMS top-400 per image: the postprocess' worst case. With the
                  ``onnx`` extra also the exported ONNX detector (``python -m
                  ssd_lightning.export``: the same network and thresholds) in onnxruntime on the
                  CPU, fp32, with torch's thread count (skipped with a note without the extra)
    5 data        a training pipeline on the real images (``augmentation``: safe_crop, the
                  preset the GPU data path runs; the default recipe's iou_crop has no GPU path),
                  one thread (= one DataLoader worker): the CPU path (decode cache warm) and the
                  GPU data path's CPU side (parameters and boxes only), plus the GPU path's
                  batched pixel work on ``device`` per batch size; for a preset without a GPU
                  path the CPU path only
    6 fit         a short Lightning fit of the default recipe (trainer=gpu on CUDA, trainer=cpu
                  otherwise; weights none, no logger): steady-state train img/s (epochs after
                  the first, validation excluded) vs section 2 at the same batch size, and the
                  total wall time
The fit uses the DataModule's default data path (on CUDA: ``data.gpu_augment=auto`` = the GPU
path; ``'fit_overrides=[data.gpu_augment=false]'`` for the CPU workers). On a shared CPU the
numbers drift with the load; runs of the sections are interleaved (bare, step, torchvision,
bare, ...) so drift hits them alike, but treat CPU ratios as indicative.
About 2 minutes on an idle 2-core CPU with the defaults; ``image_size=128`` is ~4x faster.

The table printed at the end holds the ratios step/bare, torchvision/bare, step/torchvision and
detect/bare, torchvision_eval/bare, detect/torchvision_eval, onnxruntime/detect; the JSON holds
everything.
"""

from ssd_lightning.tools.benchmark.report import main, run

__all__ = ["main", "run"]
