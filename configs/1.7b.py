"""Qwen3-1.7B backbone with the full 3D-ML recipe (MEL r_max 512, MLL, MRL).

Default layout (mlembed_jax/presets.py): FSDP over every device (one GPU: a plain single-device
run), one pack of 8 samples per device; tools/aot_compile.py
prints its memory per GPU (README table).
"""

from mlembed_jax.presets import qwen3_config


def get_config():
    c = qwen3_config("1.7b")
    c.lock()
    return c
