"""The demo: a small Qwen3-shaped encoder trained from scratch on the shipped CLDR data.

Runs on a laptop CPU in about a minute or two (README: `make demo`). The data, manifest and
tokenizer live in mlembed_jax/demo_data (see its README for source and license).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mlembed_jax.config import base_config  # noqa: E402

DEMO_DATA = os.path.join(ROOT, "mlembed_jax", "demo_data")


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 4096  # the demo tokenizer's vocabulary
    m.eos_token_id = 1
    m.hidden_size = 128
    m.intermediate_size = 256
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 32
    m.mel_r_max = 64
    m.mel_r_min = 16
    m.compute_dtype = "float32"  # CPU: bf16 matmuls are slower than fp32 there
    m.remat = "none"

    d = c.data
    d.manifest = os.path.join(DEMO_DATA, "manifest.json")
    d.prepared_dir = os.path.join(DEMO_DATA, "prepared")
    d.max_seq_length = 64
    d.seq_len = 64
    d.rows_per_pack = 12
    d.validation_fraction = 0.05

    o = c.optim
    o.lr = 1e-3  # from scratch, so far above the recipe's fine-tuning lr
    o.min_lr = 1e-5
    o.warmup_steps = 30

    t = c.train
    t.epochs = 2
    t.log_every = 20
    t.eval_every = 200
    t.checkpoint_every = 200
    c.lock()
    return c
