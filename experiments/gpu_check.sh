#!/usr/bin/env bash
# The GPU validation command: on a machine with one NVIDIA GPU, from a checkout of this repo,
#   bash experiments/gpu_check.sh
# uses a Python whose JAX already sees the GPU, or makes .venv-gpu with CUDA-enabled JAX (needs the
# package index), then runs experiments/gpu_check.py. Results: experiments/out/gpu/gpu_check.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
has_gpu_jax() { "$1" -c "import jax, flax, optax; assert jax.default_backend() == 'gpu'" >/dev/null 2>&1; }
PY=""
for candidate in .venv-gpu/bin/python python3 .venv/bin/python; do
  if command -v "$candidate" >/dev/null 2>&1 && has_gpu_jax "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q --upgrade pip
  .venv-gpu/bin/pip install -q -e . "jax[cuda12]==0.10.2"
  PY=.venv-gpu/bin/python
fi
echo "using $PY"
PYTHONPATH=. PYTHONUNBUFFERED=1 "$PY" experiments/gpu_check.py "$@"
