"""NVIDIA GPUs that tools/aot_compile.py compiles for without a GPU, from XLA's own
descriptions of them. No JAX here (perf/aot_target.py parses --topology before JAX starts).

Each GPU is a GpuTargetConfigProto in text form (gpu_specs/*.txtpb, copied from XLA; the
README there names the source): what XLA:GPU needs to compile for the device (compute
capability, shared memory, core count, HBM size). JAX's CUDA plugin turns one into described
devices (`jax.experimental.topologies.get_topology_desc(platform="cuda", ...)`), and
`jit(...).lower(...).compile()` then runs XLA:GPU's whole pipeline on this machine's CPU.

The memory budget is ours: XLA:GPU never reports running out of memory. It rematerialises
toward a limit of its own and compiles the program anyway when it cannot get there. A JAX
process preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the HBM (0.75 by default), so that
fraction is the limit.
"""

from __future__ import annotations

import dataclasses
import os
import re
from importlib import resources

# --topology name -> spec file (without .txtpb). Plain "h100" is the SXM part (HGX nodes).
GPU_SPECS = {
    "h100": "h100_sxm",
    "h100_sxm": "h100_sxm",
    "h100_pcie": "h100_pcie",
    "h200": "h200",
    "b200": "b200",
}
# The fraction of HBM a JAX process preallocates when XLA_PYTHON_CLIENT_MEM_FRACTION is unset.
JAX_DEFAULT_MEM_FRACTION = 0.75
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# Fields newer than the GpuTargetConfigProto that jaxlib 0.10.2's plugin parses.
_UNPARSED_FIELDS = ("collective_memory_granularity",)


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU model as XLA describes it."""

    name: str  # --topology name: "h100", "h200", ...
    spec_file: str  # "h100_sxm.txtpb"
    device_name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    hbm_bytes: int  # device_memory_size
    text: str  # the GpuTargetConfigProto text for the CUDA plugin


def known_gpus() -> list[str]:
    return sorted(GPU_SPECS)


def load(name: str) -> GpuSpec:
    """The spec of GPU `name` (a key of GPU_SPECS); KeyError for an unknown one."""
    file = GPU_SPECS[name] + ".txtpb"
    text = resources.files("mlembed_jax.perf").joinpath("gpu_specs", file).read_text()
    text = "\n".join(line for line in text.splitlines()
                     if line.split(":")[0].strip() not in _UNPARSED_FIELDS)
    field = lambda key: re.search(rf"^\s*{key}:\s*(.+)$", text, re.M).group(1).strip()
    cc = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)(?:\s*minor:\s*(\d+))?", text)
    return GpuSpec(name, file, field("device_description_str").strip('"'),
                   f"{cc.group(1)}.{cc.group(2) or 0}", int(field("device_memory_size")), text)


def mem_fraction(environ=None) -> tuple[float, str]:
    """(fraction of HBM a JAX process gets, where it comes from): XLA_PYTHON_CLIENT_MEM_FRACTION
    if set, else JAX's default. ValueError naming the variable for a value outside (0, 1]."""
    env = os.environ if environ is None else environ
    raw = env.get(MEM_FRACTION_ENV)
    if raw is None or raw == "":
        return JAX_DEFAULT_MEM_FRACTION, "JAX's default preallocation"
    try:
        frac = float(raw)
    except ValueError:
        frac = -1.0
    if not 0 < frac <= 1:
        raise ValueError(f"{MEM_FRACTION_ENV}={raw!r} must be a number in (0, 1], e.g. 0.90")
    return frac, f"{MEM_FRACTION_ENV}={raw}"
