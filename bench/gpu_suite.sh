#!/usr/bin/env bash
# Issue 15 §4: lorakit's GPU paths on one CUDA device — correctness against CPU results, then
# lorakit vs PEFT (+ bitsandbytes for QLoRA) step timings side by side, one table, ~10 minutes.
# Without a CUDA device it prints why and exits 0. Extra arguments go to bench/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if ! command -v nvidia-smi >/dev/null 2>&1 && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
  echo "gpu_suite: no CUDA device (nvidia-smi not found); nothing was run."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout 900 python bench/gpu_suite.py "$@"
