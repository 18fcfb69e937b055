"""Shared by the size configs: the recipe's base config with one Qwen3 shape filled in.

Shapes (hidden, intermediate, layers, q heads, kv heads) and tie flags are the published
Qwen3 ones (see ../shared/RECIPE.md); vocab 151,936, head_dim 128, RoPE theta 1e6.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlembed_jax.config import base_config  # noqa: E402

QWEN3_SHAPES = {
    #        hidden, intermediate, layers, heads, kv_heads, tied
    "0.6b": (1024, 3072, 28, 16, 8, True),
    "1.7b": (2048, 6144, 28, 16, 8, True),
    "4b": (2560, 9728, 36, 32, 8, True),
    "8b": (4096, 12288, 36, 32, 8, False),
}


def qwen3_config(size: str):
    hidden, inter, layers, heads, kv, tied = QWEN3_SHAPES[size]
    c = base_config()
    m = c.model
    m.hidden_size, m.intermediate_size, m.num_layers = hidden, inter, layers
    m.num_heads, m.num_kv_heads, m.tie_word_embeddings = heads, kv, tied
    return c
