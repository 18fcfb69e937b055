"""Qwen3-1.7B backbone with the full 3D-ML recipe (MEL r_max 512, MLL, MRL).

Default layout (configs/_qwen3.py): FSDP over every device (one GPU: a plain single-device
run), one pack of 8 samples per device; tools/aot_compile.py gives ~16 GB per GPU on 8 H100.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _qwen3 import qwen3_config  # noqa: E402


def get_config():
    c = qwen3_config("1.7b")
    c.lock()
    return c
