#!/bin/bash
# The GPU figures in one go, on a machine with CUDA and this project installed: the CUDA tests
# (failing, not skipping, without a GPU), routed inference on the GPU as adapters pile up, and
# training on the GPU against the careful HF script (fp32 and bf16; each of ahl's levers on its
# own, one task twice), then ahl's defaults on this machine's CPU.
# Logs land in ${OUT:-bench-out/gpu}; each step has its own time limit so one hang costs only it.
#     bash bench/gpu.sh [PYTHON]
set -u
python=${1:-.venv/bin/python}
out=${OUT:-bench-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start ))s] $*"; }

step tests
AHL_REQUIRE_GPU=1 timeout 100 "$python" -m pytest tests/test_gpu.py -rA -q -p no:cacheprovider \
    --durations=5 -W ignore 2>&1 | tee "$out/tests.log" | grep -E 'PASSED|FAILED|ERROR|passed|failed|slowest|s call'
step inference on cuda
timeout 120 "$python" bench/inference.py --device cuda --rounds 3 2>&1 | tee "$out/inference.log" \
    | grep -E '^\||^20|^memory|adapters:'
# Every lever on its own, the task twice: what a process's first task pays
step training on cuda
timeout 220 "$python" bench/train_speed.py --device cuda --peer-bf16 \
    --tasks wordnet_things,wordnet_things 2>&1 | tee "$out/train_cuda.log" | grep -E '^  |^\||^20'
step training on the cpu
timeout 100 "$python" bench/train_speed.py --device cpu --default-only --tasks wordnet_things 2>&1 \
    | tee "$out/train_cpu.log" | grep -E '^  |^\||^20'
step done
