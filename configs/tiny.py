"""A tiny Qwen3-shaped encoder for tests and CPU smoke runs (seconds per step on 2 cores)."""

from mlembed_jax.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 4096
    m.hidden_size = 64
    m.intermediate_size = 128
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 16
    m.eos_token_id = 1
    m.mel_r_max = 32
    m.mel_r_min = 8
    m.param_dtype = "float32"
    m.compute_dtype = "float32"
    m.remat = "none"
    m.scan_unroll = 4  # straight-line layers: on CPU the scan's stacked buffers cost more
    d = c.data
    d.max_seq_length = 64
    d.seq_len = 64
    c.lock()
    return c
