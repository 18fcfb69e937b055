#!/usr/bin/env bash
# The GPU measurement behind the README's Performance table (issue 8), as one script for a
# lent H100/H200 (`device` tool). From the repo root, first fetch the wheels the GPU image
# lacks:  ../shared/tools/device_wheels.sh   then run this with carry=[".whl"].
# Each benchmark prints its own table; everything also lands in $OUT (or ./bench_out).
set -euo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD"
# Set before JAX starts: overlap collectives/compute, and let XLA use cuDNN fusions.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

bench() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name" | tee -a "$OUT/all.txt"
  python3 tools/benchmark.py "$@" 2>"$OUT/$name.err" | tee -a "$OUT/all.txt" || \
    { echo "FAILED: $name (see $name.err)" | tee -a "$OUT/all.txt"; tail -20 "$OUT/$name.err"; }
}

bench 0.6b --config=configs/0.6b.py --steps=10 --warmup=3 --baseline=torch --compare_plain \
  --config.model.attention=cudnn --config.model.remat=attn_out
bench 1.7b --config=configs/1.7b.py --steps=10 --warmup=3 --baseline=torch \
  --config.model.attention=cudnn --config.model.remat=attn_out
