"""Qwen3-0.6B backbone with the full 3D-ML recipe (MEL r_max 512, MLL, MRL).

Meant for one GPU. Default layout (mlembed_jax/presets.py): data parallel (mesh.data=-1), so the
same config uses every device of a bigger machine as a full replica; one pack of 8 samples
per device. tools/aot_compile.py --topology=h100:1 prints its memory (README table).
"""

from mlembed_jax.presets import qwen3_config


def get_config():
    c = qwen3_config("0.6b")
    c.lock()
    return c
