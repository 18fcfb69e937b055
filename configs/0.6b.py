"""Qwen3-0.6B backbone with the full 3D-ML recipe (MEL r_max 512, MLL, MRL).

Meant for one GPU. Default layout (configs/_qwen3.py): data parallel (mesh.data=-1), so the
same config uses every device of a bigger machine as a full replica; one pack of 8 samples
per device. tools/aot_compile.py --topology=h100:1 gives ~18 GB (README table).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _qwen3 import qwen3_config  # noqa: E402


def get_config():
    c = qwen3_config("0.6b")
    c.lock()
    return c
