#!/usr/bin/env bash
# GPU checks (items 1 and 2 of benchmarks/README.md) with CUDA, bf16 autocast and TF32 on.
# Run from the repository root on a machine with one CUDA GPU; about 4-5 minutes
# (ViT-B-16 random weights, nothing downloaded). Writes benchmarks/results/*-cuda-bf16.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 150 "$PY" benchmarks/bench_roi_pool.py --device cuda --amp bf16
timeout 150 "$PY" benchmarks/bench_train_step.py --device cuda --amp bf16
timeout 150 "$PY" benchmarks/bench_lora_attention.py --device cuda --amp bf16
timeout 240 "$PY" benchmarks/bench_train_step.py --device cuda --amp bf16 --compile  # last: compiles
