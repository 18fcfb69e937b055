"""Starting JAX's distributed runtime on whatever cluster the run is on.

- explicit: MLEMBED_COORDINATOR (host:port), MLEMBED_NUM_PROCESSES, MLEMBED_PROCESS_ID;
- SLURM with more than one task, or a multi-host TPU VM: jax.distributed.initialize()
  detects the cluster itself;
- otherwise a single process and nothing to do.
Must run before any other JAX call. Grain worker processes never call it.
"""

from __future__ import annotations

import os

import jax


def _cluster_kind() -> str | None:
    env = os.environ
    if env.get("MLEMBED_COORDINATOR"):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def maybe_initialize() -> str | None:
    """Initialises jax.distributed if the environment describes a multi-process run.
    Returns the kind of cluster found, or None for a single process."""
    kind = _cluster_kind()
    if kind is None:
        return None
    if kind == "explicit":
        env = os.environ
        for var in ("MLEMBED_NUM_PROCESSES", "MLEMBED_PROCESS_ID"):
            if var not in env:
                raise RuntimeError(f"MLEMBED_COORDINATOR is set but {var} is not; set all three "
                                   "of MLEMBED_COORDINATOR, MLEMBED_NUM_PROCESSES, "
                                   "MLEMBED_PROCESS_ID")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes exchange collectives through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env["MLEMBED_COORDINATOR"],
            num_processes=int(env["MLEMBED_NUM_PROCESSES"]),
            process_id=int(env["MLEMBED_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return kind
