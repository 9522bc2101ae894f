#!/usr/bin/env bash
# The GPU figures on one CUDA GPU (written for an H100): the benchmark at bs 32 and 128 in bf16, a
# torch.compile variant, and the default recipe end to end (wall time, start-up included).
#
#   OUT=/path/to/results scripts/gpu_bench.sh      # OUT defaults to outputs/gpu_bench
#
# Everything lands in $OUT: benchmark_*.json/.log, recipe_*.log + run dirs, summary.txt.
# Each step has its own time limit and a failing step does not stop the next one. Expected total:
# ~6-10 minutes. PYTHON overrides the interpreter (default: .venv/bin/python, else python).
# To fit a short device lease, pick steps and shrink their limits (seconds). On an H200 (the
# README's table) a 120-epoch run wrote ~1.35 s per epoch, most of it last.ckpt, before that was
# written at most once a minute; for a 15-minute lease (start-up and a rerun included), e.g.
#   STEPS="benchmark recipe_default recipe_gpu_augment" BENCH_LIMIT=180 RECIPE_LIMIT=150 \
#   RECIPE_ARGS="trainer.max_epochs=100" scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_bench}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch, torchvision, lightning, os
print("torch", torch.__version__, "torchvision", torchvision.__version__, "lightning", lightning.__version__)
print("cuda available", torch.cuda.is_available(), "cpus", os.cpu_count())
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print("device", torch.cuda.get_device_name(0))
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# DataLoader settings for the 16-core GPU machine (the recipe's default is 2 workers)
LOADER_ARGS=(data.num_workers=8 data.pin_memory=true data.persistent_workers=true)
LOADER_LIST=$(IFS=,; echo "${LOADER_ARGS[*]}")

STEPS="${STEPS:-benchmark compile recipe_default recipe_gpu_augment}"
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step <name> <seconds> <command...>: run with a limit, log, and record the wall time
    local name="$1" limit="$2"; shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    printf '%-32s rc=%-3s wall=%7.1f s\n' "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" \
        | tee -a "$OUT/walltimes.txt"
    tail -n 30 "$OUT/$name.log"
}

# 1. the benchmark: sections 1-6, bs 32 and 128, bf16 autocast, channels_last
wanted benchmark && step benchmark_cuda_bf16 "${BENCH_LIMIT:-420}" "$PY" -m ssd_lightning.benchmark device=cuda precision=bf16 \
    'batch_sizes=[32,128]' steps=20 warmup=10 repeats=5 data_samples=400 fit_epochs=10 \
    "fit_overrides=[${LOADER_LIST}]" out="$OUT/benchmark_cuda_bf16.json"

# 2. the same network under torch.compile (sections 1, 2, 4 only; may fail on a new stack)
wanted compile && step benchmark_cuda_bf16_compile "${COMPILE_LIMIT:-300}" "$PY" -m ssd_lightning.benchmark device=cuda precision=bf16 \
    'batch_sizes=[32,128]' steps=20 warmup=10 repeats=5 compile=true \
    'sections=[bare,step,inference]' out="$OUT/benchmark_cuda_bf16_compile.json"

# 3. the default recipe end to end (320 epochs, validation every 10), start-up included.
#    RECIPE_ARGS adds overrides to both runs, e.g. to fit a short device budget:
#    RECIPE_ARGS="trainer.max_epochs=120" (validation then every 3 epochs)
read -r -a RECIPE_EXTRA <<< "${RECIPE_ARGS:-}"
#    a) `python -m ssd_lightning.train` (on a GPU: bf16-mixed); its iou_crop augmentation runs on
#    the CPU data path, here with 8 pinned persistent workers
#    (overwrite=true: a rerun into the same $OUT starts these runs over)
wanted recipe_default && step recipe_default "${RECIPE_LIMIT:-600}" "$PY" -m ssd_lightning.train "${LOADER_ARGS[@]}" "${RECIPE_EXTRA[@]}" \
    overwrite=true "hydra.run.dir=$OUT/recipe_default"
#    b) augmentation=safe_crop on the GPU data path (the crops batched on the device)
wanted recipe_gpu_augment && step recipe_gpu_augment "${RECIPE_LIMIT:-600}" "$PY" -m ssd_lightning.train augmentation=safe_crop \
    data.gpu_augment=true "${RECIPE_EXTRA[@]}" overwrite=true "hydra.run.dir=$OUT/recipe_gpu_augment"

# 4. one summary file
"$PY" - "$OUT" <<'EOF' > "$OUT/summary.txt" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("benchmark_*.json")):
    print(f"== {f.name}")
    print(json.loads(f.read_text())["table"])
    print()
print("== wall times (start-up included)")
if (out / "walltimes.txt").exists():
    print((out / "walltimes.txt").read_text())
for d in sorted(out.glob("recipe_*/metrics.json")):
    m = json.loads(d.read_text())
    keys = ("val/map_50", "val/map", "train/loss")
    print(d.parent.name, {k: m.get(k) for k in keys})
EOF
cat "$OUT/summary.txt"
