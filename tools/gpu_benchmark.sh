#!/usr/bin/env bash
# The GPU measurement behind the README's Performance table, as one script for an H100/H200
# machine (about 9 minutes after a preflight of up to 4). On a machine with network access,
# first:
#   tools/fetch_gpu_wheels.sh
# then copy the checkout with .whl/ to the GPU machine and run:  bash tools/gpu_benchmark.sh
#
#   bash tools/gpu_benchmark.sh --preflight [--gpu=h100]   (or MLEMBED_BENCH_PREFLIGHT=1)
# only compiles, on the CPU with XLA:GPU and no GPU (tools/aot_compile.py, the gpu-aot
# extra), every train-step program the stages below time (both kernels, the plain variant,
# stage 5's variants), so a kernel or config mistake shows up before any GPU time is spent.
# A GPU run does this first (stage 0) and stops if a program does not compile or fit.
#
# Stages, each with its own time limit (capped so that 1.7B always gets its turn within the
# budget), appending to $OUT/all.txt as it goes (a cut-off run
# still returns what it measured):
#   0. preflight: the programs below compiled deviceless for this GPU, half the cores'
#      worth at a time (MLEMBED_PREFLIGHT_BUDGET=240 s; what the limit cuts off is listed as
#      unchecked, a program that fails to compile or fit stops the run).
#   1. the GPU kernel tests (cuDNN, tokamax mosaic/triton vs the dense reference, no text
#      sees another);                                                         ~1 min
#   2. tools/bench_attention.py: every GPU kernel on one step of the mix;   ~1 min
#   3. 0.6B: ours (3D-ML, plain) and the torch reference, with a profile;    ~3 min
#   4. 1.7B: ours and the torch reference;                                    ~2 min
#   5. if time is left, 0.6B with remat=full (least memory), then as variants:
#      dots_attention (only elementwise work recomputed), the same and attention with bf16
#      params (the reference's choice), the other kernel, and grad_cache_chunks=1 (what
#      cached gradients cost at the same batch).
# The full-step kernel is tokamax_mosaic where stage 1 and 2 pass for it, else cudnn.
# MLEMBED_BENCH_SMOKE=1 runs the same stages on CPU with tiny shapes and portable kernels
# (tests/test_benchmark.py), so a mistake here is caught before a GPU is used.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
LOG="$OUT/all.txt"
SMOKE=${MLEMBED_BENCH_SMOKE:-0}
PREFLIGHT_ONLY=${MLEMBED_BENCH_PREFLIGHT:-0}
GPU=${MLEMBED_BENCH_GPU:-}  # h100, h200, b200: the spec the preflight compiles for
for arg in "$@"; do
  case "$arg" in
    --preflight) PREFLIGHT_ONLY=1 ;;
    --gpu=*) GPU=${arg#--gpu=} ;;
    *) echo "error: unknown argument $arg; use --preflight and --gpu=h100|h200|b200" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
BUDGET=${MLEMBED_BENCH_BUDGET:-540}  # seconds of script time after the preflight
say() { echo "$*" | tee -a "$LOG"; }

limit() {  # wanted seconds, seconds to keep for the stages after it -> this stage's limit
  local left=$((BUDGET - SECONDS - $2))
  [ "$left" -lt 30 ] && left=30
  echo $(($1 < left ? $1 : left))
}

stage() {  # name, seconds, command...: stdout to the log and $OUT/name.txt; returns its rc
  local name=$1 limit=$2
  shift 2
  say "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s): $*"
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.txt" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    say "-- $name exited $rc (124 = time limit); last lines of its stderr:"
    tail -15 "$OUT/$name.err" | tee -a "$LOG"
  fi
  return "$rc"
}

if [ "$SMOKE" = 1 ]; then
  FAST=tokamax_xla SAFE=xla_sdpa KERNEL_TESTS="tokamax_xla or xla_sdpa"
  CFG_SMALL=configs/tiny.py CFG_BIG=configs/tiny.py PLATFORM=cpu
  SHAPE=(--config.data.seq_len=128 --config.data.max_seq_length=128
         --config.data.num_shapes=1)
  ATTN_SHAPE=(--seq_len=128 --rows=64 --heads=4 --kv_heads=2 --head_dim=32 --steps=2)
  STEPS=(--steps=1 --warmup=1)
else
  FAST=tokamax_mosaic SAFE=cudnn KERNEL_TESTS="cudnn or tokamax_mosaic or tokamax_triton"
  CFG_SMALL=configs/0.6b.py CFG_BIG=configs/1.7b.py PLATFORM=cuda
  SHAPE=()
  ATTN_SHAPE=(--steps=20)
  STEPS=(--steps=10 --warmup=3)
fi
if [ "$SMOKE" != 1 ] && [ "$PREFLIGHT_ONLY" != 1 ]; then
  if ! ls .whl/tokamax-*.whl >/dev/null 2>&1; then
    say "error: no .whl/tokamax-*.whl here. On the dev machine run"
    say "  tools/fetch_gpu_wheels.sh"
    say "and pass carry=[\".whl\"] to the device call."
    exit 2
  fi
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || say "warning: wheel install failed (see above)"
  export PYTHONPATH="$SITE:$PWD"
  source launch/xla_gpu_flags.sh  # training's XLA flags (launch/slurm_gpu.sbatch), before JAX starts
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
  if [ -z "$GPU" ]; then
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
      *H200*) GPU=h200 ;; *B200*) GPU=b200 ;; *H100*PCIe*) GPU=h100_pcie ;; *) GPU=h100 ;;
    esac
  fi
fi
GPU=${GPU:-h100}

# 0. Preflight: every train-step program the stages time, compiled by XLA:GPU on the CPU
# for $GPU (tools/aot_compile.py; no GPU used). The kernel of stages 3-5 is chosen at run
# time, so both candidates are compiled.
preflight_programs() {  # one line per program: tools/aot_compile.py arguments
  local cfg k other plain
  for cfg in "$CFG_SMALL" "$CFG_BIG"; do
    plain=$("$PY" -c "
import sys
from mlembed_jax.config import load_config_file
c = load_config_file(sys.argv[1], {})
print(f'--config.model.mel=False --config.model.exits=({c.model.num_layers},) '
      f'--config.loss.mrl_min_dim={c.model.hidden_size}')" "$cfg") || return 2
    for k in "$FAST" "$SAFE"; do
      echo "--config=$cfg --config.model.attention=$k --config.model.remat=attention ${SHAPE[*]}"
      [ "$cfg" = "$CFG_SMALL" ] && echo "--config=$cfg --config.model.attention=$k --config.model.remat=attention $plain ${SHAPE[*]}"
    done
  done
  for k in "$FAST" "$SAFE"; do
    for v in "--config.model.remat=full" "--config.model.remat=dots_attention" \
        "--config.model.param_dtype=bfloat16 --config.model.remat=dots_attention" \
        "--config.model.param_dtype=bfloat16 --config.model.remat=attention" \
        "--config.model.remat=full --config.train.grad_cache_chunks=1"; do
      echo "--config=$CFG_SMALL --config.model.attention=$k $v ${SHAPE[*]}"
    done
  done
}

preflight() {  # [seconds]: compiles them, JOBS at a time, within the time limit (0: none);
  # returns non-zero if one fails or does not fit (ones the limit cut off are only listed)
  local seconds=${1:-0}
  local jobs=${MLEMBED_PREFLIGHT_JOBS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
  local list="$OUT/preflight_programs.txt"
  # The CPU smoke run (tests) compiles the first MLEMBED_PREFLIGHT_LIMIT programs only.
  local limit=${MLEMBED_PREFLIGHT_LIMIT:-0}
  [ "$SMOKE" = 1 ] && [ "$limit" = 0 ] && limit=2
  preflight_programs | awk -v n="$limit" '!seen[$0]++ && (n == 0 || ++k <= n)' > "$list" \
    || { say "preflight: could not list programs"; return 2; }
  say "== preflight ($(date -u +%H:%M:%S) UTC): $(wc -l < "$list") programs for $GPU, XLA:GPU on the CPU, $jobs at a time"
  # shellcheck disable=SC2016
  nl -ba -w1 -s' ' "$list" | timeout "$seconds" xargs -P "$jobs" -L 1 bash -c '
    i=$1; shift
    JAX_PLATFORMS=cpu "$0" tools/aot_compile.py --topology="$GPU:1" "$@" >"$OUT/preflight_$i.txt" 2>"$OUT/preflight_$i.err"
    echo "exit $?" >>"$OUT/preflight_$i.txt"' "$PY"
  local bad=0 cut=0 i=0 line
  while IFS= read -r line; do
    i=$((i + 1))
    local res rc
    rc=$(tail -1 "$OUT/preflight_$i.txt" 2>/dev/null)
    if [[ "$rc" != "exit "* ]]; then
      say "  [not compiled: time limit] $line"
      cut=$((cut + 1))
      continue
    fi
    res=$(grep -m1 "^RESULT" "$OUT/preflight_$i.txt" || tail -1 "$OUT/preflight_$i.err")
    say "  [$rc] $line"
    say "        ${res:-no output}"
    [ "$rc" = "exit 0" ] || bad=1
  done < "$list"
  [ "$cut" -gt 0 ] && say "  WARNING: $cut program(s) not compiled within the ${seconds}s limit (unchecked)"
  return $bad
}

export GPU OUT
if [ "$PREFLIGHT_ONLY" = 1 ]; then
  preflight
  rc=$?
  say "== preflight $([ $rc = 0 ] && echo passed || echo FAILED) in ${SECONDS}s"
  exit $rc
fi
if ! "$PY" -c "from mlembed_jax.perf.aot_target import cuda_plugin_installed as f; raise SystemExit(not f())" 2>/dev/null; then
  say "== preflight skipped: jax's CUDA plugin is not installed (make gpu-aot, or pip install -e '.[gpu-aot]')"
elif ! preflight "${MLEMBED_PREFLIGHT_BUDGET:-240}"; then
  say "error: a program above does not compile or fit for $GPU; fix it before spending GPU time"
  exit 1
fi
BUDGET=$((BUDGET + SECONDS))  # the stages' budget starts after the preflight
say "XLA_FLAGS=${XLA_FLAGS:-}"
"$PY" -c "
import jax, jaxlib, flax, optax, torch, transformers
print('python', __import__('sys').version.split()[0], '| jax', jax.__version__, '| jaxlib',
      jaxlib.__version__, '| flax', flax.__version__, '| optax', optax.__version__, '| torch',
      torch.__version__, '| transformers', transformers.__version__)
try:
    import tokamax
    print('tokamax', getattr(tokamax, '__version__', '?'))
except Exception as e:
    print('tokamax does not import:', type(e).__name__, e)
print('devices:', jax.devices())" 2>&1 | tee -a "$LOG"

# 1. Kernel correctness on this device.
JAX_PLATFORMS=$PLATFORM stage kernel_tests "$(limit 150 390)" "$PY" -m pytest -q -rA -p no:cacheprovider \
  tests/test_attention_kernels.py -k "$KERNEL_TESTS"
fast_ok=0
if grep -q "PASSED.*$FAST" "$OUT/kernel_tests.txt" && ! grep -q "FAILED.*$FAST" "$OUT/kernel_tests.txt"; then
  fast_ok=1
fi

# 2. Each kernel alone, on one step of the mix (also checks it on these rows).
stage attention "$(limit 100 330)" "$PY" tools/bench_attention.py --kernels="dense,$SAFE,$FAST,tokamax_triton" \
  "${ATTN_SHAPE[@]}"
grep -q "^| $FAST | .* | no |$" "$OUT/attention.txt" || fast_ok=0
ATTN=$SAFE
[ "$fast_ok" = 1 ] && ATTN=$FAST
say "full-step attention kernel: $ATTN (fast kernel passed its checks: $fast_ok)"

# 3. and 4. The full train step against the reference.
# remat=attention: the layer is recomputed but the attention kernel is not (attn_out would
# rerun it: custom-VJP residuals are not named). Stage 5 shows the other choices.
common=("${STEPS[@]}" --baseline=torch --config.model.attention="$ATTN" --config.model.remat=attention)
PROFILE=$(mktemp -d)  # outside $OUT: traces are large; the summary is in the log
stage bench_small "$(limit 260 150)" "$PY" tools/benchmark.py --config="$CFG_SMALL" "${common[@]}" \
  --compare_plain --profile_dir="$PROFILE" "${SHAPE[@]}"
stage bench_big "$(limit 220 0)" "$PY" tools/benchmark.py --config="$CFG_BIG" "${common[@]}" "${SHAPE[@]}"

# 5. Only with time to spare: what the choices are worth on 0.6B,
# one row each, in one process (rows print as they finish).
other=$FAST
[ "$ATTN" = "$FAST" ] && other=$SAFE
if [ "$SECONDS" -lt $((BUDGET - 120)) ]; then
  stage bench_small_choices "$(limit 600 0)" "$PY" tools/benchmark.py \
    --config="$CFG_SMALL" "${STEPS[@]}" --config.model.attention="$ATTN" \
    --config.model.remat=full --variant=model.remat=dots_attention \
    --variant=model.param_dtype=bfloat16,model.remat=dots_attention \
    --variant=model.param_dtype=bfloat16,model.remat=attention \
    --variant=model.attention="$other",model.remat=attention \
    --variant=train.grad_cache_chunks=1 \
    "${SHAPE[@]}"
else
  say "skipped stage 5 (0.6B choices): ${SECONDS}s used"
fi
say "== done in ${SECONDS}s"
