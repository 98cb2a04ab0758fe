#!/usr/bin/env bash
# GPU checks (items 1, 2 and 7 of benchmarks/README.md) with CUDA, bf16 autocast and TF32 on.
# Run from the repository root on a machine with one CUDA GPU; about 6-7 minutes
# (ViT-B-16 random weights, nothing downloaded). Writes benchmarks/results/*-cuda-bf16.json.
# Item 7 is a 3-hospital federated simulation (Flower + Ray, simulation.client_gpus: auto):
# its round time vs the same central steps, and whether the actors held the GPU.
#
# Python: .venv/bin/python when the repo has one; otherwise the machine's python3 with the
# repo on PYTHONPATH, plus the wheels in .whl/ (for a GPU image without open_clip):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  PY=${PY:-.venv/bin/python}
else
  PY=${PY:-python3}
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/savlt-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/savlt-site"
  fi
fi
export TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, open_clip, peft; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'peft', peft.__version__)"
status=0
run() {  # one benchmark; a failure is reported and the others still run
  timeout "$1" "$PY" "${@:2}" --device cuda --amp bf16 || { echo "FAILED ($?): ${*:2}"; status=1; }
}
run 150 benchmarks/bench_roi_pool.py
run 150 benchmarks/bench_train_step.py
run 150 benchmarks/bench_lora_attention.py
run 300 benchmarks/bench_gpu_federation.py
run 240 benchmarks/bench_train_step.py --compile  # last: compiling takes minutes
exit $status
