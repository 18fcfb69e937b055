#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v5p-128, v6e-64, ...), or of every slice of
# a multi-slice queued resource, at once.
#
#   launch/tpu_pod.sh (--tpu=NAME | --queued-resource=QR) --zone=ZONE [--project=PROJECT] \
#       [--repo=DIR] [--setup] [--dry-run] --config=configs/8b.py \
#       --workdir=/mnt/shared/runs/8b [--config.x=y ...]
#
# Runs, through `gcloud compute tpus tpu-vm ssh NAME --worker=all` (one slice) or
# `gcloud compute tpus queued-resources ssh QR --node=all --worker=all` (every slice of a
# queued resource, e.g. created with --node-count=2), the same command on every host:
# `cd DIR && MLEMBED_DISTRIBUTED=auto .venv/bin/python -m mlembed_jax.train ARGS`.
# jax.distributed then finds the hosts and slices itself (the TPU VM metadata), the mesh puts
# data parallelism across slices (mesh.dcn_data=-1: one per slice) with FSDP inside each, and
# each host feeds its own chips' share of the batch.
#   --repo=DIR  the checkout on the workers (default: ~/mlembed_jax); copy it there first,
#               e.g. `gcloud compute tpus tpu-vm scp --recurse --worker=all . NAME:mlembed_jax`
#               (without .venv).
#   --setup     first create DIR/.venv on every worker, `pip install -e '.[tpu]'` into it (jax
#               with the libtpu that jax pins) and check that pin.
#   --dry-run   print the exact gcloud commands and exit.
# The workdir must be one directory every host sees at the same path (a Filestore/NFS or
# gcsfuse mount): Orbax writes each checkpoint cooperatively from all hosts. The prepared data
# must be readable at its configured path on every host too. Rerunning resumes.
set -euo pipefail

DRY=0; SETUP=0; TPU=""; QR=""; ZONE=""; PROJECT=""; REPO='~/mlembed_jax'; ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --setup) SETUP=1 ;;
    --tpu=*) TPU="${a#*=}" ;;
    --queued-resource=*) QR="${a#*=}" ;;
    --zone=*) ZONE="${a#*=}" ;;
    --project=*) PROJECT="${a#*=}" ;;
    --repo=*) REPO="${a#*=}" ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
if [[ ( -z "$TPU" && -z "$QR" ) || ( -n "$TPU" && -n "$QR" ) || -z "$ZONE" ]]; then
  echo "error: one of --tpu=NAME or --queued-resource=QR, and --zone=ZONE, are required" \
    "(see --help)" >&2; exit 2
fi
if (( ${#ARGS[@]} == 0 )); then
  echo "error: no training arguments; pass at least --config=... --workdir=..." >&2; exit 2
fi

# The remote directory is left unquoted when it starts with ~ so the worker's shell expands it.
if [[ "$REPO" == "~"* ]]; then RDIR="$REPO"; else RDIR="$(printf '%q' "$REPO")"; fi

TRAIN="cd $RDIR && MLEMBED_DISTRIBUTED=auto .venv/bin/python -m mlembed_jax.train"
for a in "${ARGS[@]}"; do TRAIN+=" $(printf '%q' "$a")"; done
# The libtpu check: one line naming the fix, and a failed setup, if libtpu is not jax's pin.
PIN_CHECK="from mlembed_jax.perf.aot_target import check_libtpu as c; m = c(None); m and print(m); raise SystemExit(1 if m else 0)"
SETUP_CMD="cd $RDIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e \".[tpu]\" && .venv/bin/python -c \"$PIN_CHECK\""

if [[ -n "$QR" ]]; then
  GCLOUD=(gcloud compute tpus queued-resources ssh "$QR" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && GCLOUD+=("--project=$PROJECT")
  GCLOUD+=(--node=all --worker=all)
else
  GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && GCLOUD+=("--project=$PROJECT")
  GCLOUD+=(--worker=all)
fi

quote() {  # one shell word, readable: bare, '...', or printf %q
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" != *"'"* ]]; then printf "'%s'" "$1"
  else printf '%q' "$1"; fi
}

run() {  # run CMD on all workers (or print it)
  local cmd=("${GCLOUD[@]}" --command "$1")
  if (( DRY )); then
    local line="" w
    for w in "${cmd[@]}"; do line+="$(quote "$w") "; done
    echo "${line% }"
  else
    "${cmd[@]}"
  fi
}

(( SETUP )) && run "$SETUP_CMD"
run "$TRAIN"
