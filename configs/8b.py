"""Qwen3-8B backbone with the full 3D-ML recipe (MEL r_max 512, MLL, MRL).

Meant for a TPU v5p slice of 64 chips (v5p:4x4x4), two of them (multi-slice: data parallel
across slices, FSDP inside each), or one node of 8x H100 80 GB. Default layout
(mlembed_jax/presets.py): FSDP over every device of a slice (mesh.data=1, mesh.fsdp=-1), one
pack of 8 samples per device, in-batch logits in blocks of 4096 rows, the platform's fastest
attention kernel keeping its residuals. `tools/aot_compile.py --topology=v5p:4x4x4` (or
h100:8) prints the memory per chip; the README's table has the figures.
Several GPU nodes: keep FSDP inside a node (NVLink) and go data-parallel across nodes:
  --config.mesh.fsdp=8 --config.mesh.data=-1
"""

from mlembed_jax.presets import qwen3_config


def get_config():
    c = qwen3_config("8b")
    c.lock()
    return c
