"""A ~140M-parameter encoder cut from the 0.6B backbone with the recipe's own knobs.

- depth: the first 8 of 0.6B's 28 layers (8 is an MLL exit, so the cut was trained for);
- MEL: r_max 128, so the token embedding is U [151936, 128] @ V [128, 1024].

Parameter count (tests/test_configs.py recomputes it from the real param shapes):
  8 layers x 15,730,944 = 125,847,552 (attention 6,291,456 + q/k norms 256, MLP 9,437,184,
  layer norms 2,048) + U 19,447,808 + V 131,072 + final norm 1,024 = 145,427,456.
Start from the 0.6B checkpoint: --config.train.init_from=/path/to/Qwen3-0.6B (the import
keeps the first 8 layers and factorises the embedding by SVD at rank 128).
"""

from mlembed_jax.presets import qwen3_config

PARAMS_140M = 145_427_456


def get_config():
    c = qwen3_config("0.6b")
    c.model.num_layers = 8
    c.model.mel_r_max = 128
    c.lock()
    return c
