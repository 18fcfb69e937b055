#!/usr/bin/env bash
# Train on this machine: one process, or N processes on localhost joined by jax.distributed.
#
#   launch/local.sh [--dry-run] [--processes=N] [--cpu-devices=K] [--port=P] \
#       --config=configs/demo.py --workdir=runs/demo [--config.section.field=value ...]
#
#   --processes=N    N > 1 starts N processes coordinated on localhost:P (MLEMBED_COORDINATOR,
#                    MLEMBED_NUM_PROCESSES, MLEMBED_PROCESS_ID). With accelerators each
#                    process drives one of them (MLEMBED_LOCAL_DEVICE_IDS=i).
#   --cpu-devices=K  run on the CPU with K fake devices per process (JAX_PLATFORMS=cpu and
#                    XLA_FLAGS set before JAX starts); collectives go through gloo.
#   --dry-run        print the exact commands and exit.
# Every other argument goes to `python -m mlembed_jax.train`. The exit code is the first
# failing process's (143 after a SIGTERM, which saves a checkpoint first).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

DRY=0; NPROC=1; CPUDEV=""; PORT=12355; ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --processes=*) NPROC="${a#*=}" ;;
    --cpu-devices=*) CPUDEV="${a#*=}" ;;
    --port=*) PORT="${a#*=}" ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: --processes must be a positive integer" >&2; exit 2; }
[[ -z "$CPUDEV" || "$CPUDEV" =~ ^[1-9][0-9]*$ ]] || { echo "error: --cpu-devices must be a positive integer" >&2; exit 2; }

# The environment of process $1, as NAME=value words.
proc_env() {
  local i="$1" env=()
  if [[ -n "$CPUDEV" ]]; then
    env+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$CPUDEV")
  fi
  if (( NPROC > 1 )); then
    env+=("MLEMBED_COORDINATOR=localhost:$PORT" "MLEMBED_NUM_PROCESSES=$NPROC"
          "MLEMBED_PROCESS_ID=$i")
    [[ -z "$CPUDEV" ]] && env+=("MLEMBED_LOCAL_DEVICE_IDS=$i")
  fi
  if (( ${#env[@]} )); then printf '%s\n' "${env[@]}"; fi
}

cd "$ROOT"
if (( DRY )); then
  for ((i = 0; i < NPROC; i++)); do
    mapfile -t ENV < <(proc_env "$i")
    line="cd $(printf '%q' "$ROOT") && env"
    for e in "${ENV[@]}"; do line+=" $(printf '%q' "$e")"; done
    line+=" $(printf '%q' "$PY") -m mlembed_jax.train"
    for a in "${ARGS[@]}"; do line+=" $(printf '%q' "$a")"; done
    (( NPROC > 1 )) && line+=" &"
    echo "$line"
  done
  (( NPROC > 1 )) && echo "wait"
  exit 0
fi

if (( NPROC == 1 )); then
  mapfile -t ENV < <(proc_env 0)
  exec env "${ENV[@]}" "$PY" -m mlembed_jax.train "${ARGS[@]}"
fi

PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true' TERM INT
for ((i = 0; i < NPROC; i++)); do
  mapfile -t ENV < <(proc_env "$i")
  env "${ENV[@]}" "$PY" -m mlembed_jax.train "${ARGS[@]}" &
  PIDS+=($!)
done
RC=0
for p in "${PIDS[@]}"; do
  wait "$p" || { c=$?; if (( RC == 0 )); then RC=$c; fi; }
done
exit "$RC"
