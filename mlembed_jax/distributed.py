"""Starting JAX's distributed runtime on whatever cluster the run is on.

- explicit: MLEMBED_COORDINATOR (host:port), MLEMBED_NUM_PROCESSES, MLEMBED_PROCESS_ID, and
  optionally MLEMBED_LOCAL_DEVICE_IDS ("0" or "0,1,2,3": the accelerators this process
  drives; default all it can see). launch/slurm_gpu.sbatch uses this form;
- SLURM with more than one task: the same values from SLURM_* variables. With one task per
  node, the process drives every GPU it sees; with several tasks per node, one GPU each
  (SLURM_LOCALID, or the only one visible when SLURM bound one GPU per task);
- MLEMBED_DISTRIBUTED=auto (launch/tpu_pod.sh sets it on every TPU VM worker), or a
  multi-host TPU VM whose TPU_WORKER_HOSTNAMES lists several hosts: jax.distributed finds
  everything itself (on Cloud TPU, from the VM metadata);
- otherwise a single process and nothing to do.
Must run before any other JAX call. Grain worker processes never call it. On CPU (tests,
JAX_PLATFORMS=cpu) processes exchange collectives through gloo.
"""

from __future__ import annotations

import os
import re

import jax


def cluster_kind(env=None) -> str | None:
    env = os.environ if env is None else env
    if env.get("MLEMBED_COORDINATOR"):
        return "explicit"
    if env.get("MLEMBED_DISTRIBUTED", "").lower() == "auto":
        return "auto"
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise RuntimeError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def _tasks_on_this_node(env) -> int:
    """Tasks of this job step on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE
    look like '8(x2),4'; SLURM_NODEID picks this node's entry."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return 1
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else (counts[-1] if counts else 1)


def _visible_gpus(env) -> int | None:
    vis = env.get("CUDA_VISIBLE_DEVICES")
    if vis is None or vis.strip() in ("", "all"):
        return None
    return len([v for v in vis.split(",") if v.strip()])


def slurm_params(env=None) -> dict:
    """jax.distributed.initialize arguments for a SLURM job step (see module docstring).

    The coordinator is the first node of the step, on MLEMBED_COORDINATOR_PORT or a port
    derived from the job id (the same on every task)."""
    env = os.environ if env is None else env
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise RuntimeError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST")
    port = int(env.get("MLEMBED_COORDINATOR_PORT") or
               61440 + int(env.get("SLURM_JOB_ID", "0")) % 4096)
    params = dict(coordinator_address=f"{first_slurm_host(nodes)}:{port}",
                  num_processes=int(env["SLURM_NTASKS"]),
                  process_id=int(env["SLURM_PROCID"]))
    if _tasks_on_this_node(env) > 1:  # one GPU per task
        params["local_device_ids"] = [0] if _visible_gpus(env) == 1 else [
            int(env.get("SLURM_LOCALID", "0"))]
    return params


def explicit_params(env=None) -> dict:
    env = os.environ if env is None else env
    missing = [v for v in ("MLEMBED_NUM_PROCESSES", "MLEMBED_PROCESS_ID") if v not in env]
    if missing:
        raise RuntimeError(f"MLEMBED_COORDINATOR is set but {', '.join(missing)} is not; set "
                           "all three of MLEMBED_COORDINATOR, MLEMBED_NUM_PROCESSES, "
                           "MLEMBED_PROCESS_ID")
    params = dict(coordinator_address=env["MLEMBED_COORDINATOR"],
                  num_processes=int(env["MLEMBED_NUM_PROCESSES"]),
                  process_id=int(env["MLEMBED_PROCESS_ID"]))
    if env.get("MLEMBED_LOCAL_DEVICE_IDS", "").strip():
        params["local_device_ids"] = [int(x) for x in env["MLEMBED_LOCAL_DEVICE_IDS"].split(",")]
    return params


def maybe_initialize() -> str | None:
    """Initialises jax.distributed if the environment describes a multi-process run.
    Returns the kind of cluster found ('explicit', 'slurm', 'auto', 'tpu'), or None for a
    single process."""
    kind = cluster_kind()
    if kind is None:
        return None
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes exchange collectives through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind in ("auto", "tpu"):
        jax.distributed.initialize()
        return kind
    params = explicit_params() if kind == "explicit" else slurm_params()
    # Everything is given: JAX's own cluster detection would otherwise pin a SLURM task to
    # the single GPU numbered SLURM_LOCALID, even when one task should drive all 8.
    jax.distributed.initialize(cluster_detection_method="deactivate", **params)
    return kind
