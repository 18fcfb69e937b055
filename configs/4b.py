"""Qwen3-4B backbone with the full 3D-ML recipe (MEL r_max 512, MLL, MRL).

Meant for a TPU v6e-64 slice (v6e:8x8, 32 GB per chip). Default layout (mlembed_jax/presets.py):
FSDP over every chip, one pack of 8 samples per chip, the platform's fastest attention kernel
(splash on TPU) with the layer recomputed (remat full: keeping splash's residuals does not
fit); tools/aot_compile.py prints the memory per chip (README table). The same layout runs
on 8 GPUs as is.
"""

from mlembed_jax.presets import qwen3_config


def get_config():
    c = qwen3_config("4b")
    c.lock()
    return c
