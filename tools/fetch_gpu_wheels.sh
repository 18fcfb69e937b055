#!/usr/bin/env bash
# Downloads, into ./.whl, the Python 3.12 x86-64 wheels a bare GPU image lacks for
# tools/gpu_benchmark.sh: grain and ml-collections (with what they need) plus the tokamax
# kernels' packages listed in tools/gpu_wheels.txt. gpu_benchmark.sh installs them offline.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  grain ml-collections array-record portpicker $(cat tools/gpu_wheels.txt)
ls -1 .whl
