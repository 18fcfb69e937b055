"""The demo: a small Qwen3-shaped encoder trained from scratch on the shipped CLDR data.

Runs on a laptop CPU in about a minute or two (README: `make demo`). The data, manifest and
tokenizer live in mlembed_jax/demo_data (see its README for source and license).

Sized for learning from scratch in that time: 2 layers (MLL exits 1 and 2), a full-rank MEL
embedding (ranks 32, 64, 128 of d = 128; a lower r_max learns names much more slowly from
random factors), rows of 64 tokens (the names are short; the row buckets are derived from
the data), and enough epochs for every name to be seen many times: the held-out retrieval
accuracy then ends several times above chance and the validation loss well below step 0's.
"""

from mlembed_jax.config import base_config
from mlembed_jax.data import DEMO_MANIFEST, DEMO_PREPARED


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 4096  # covers the demo tokenizer's vocabulary (<= 4096)
    m.eos_token_id = 1
    m.hidden_size = 128
    m.intermediate_size = 256
    m.num_layers = 2
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 32
    m.mel_r_max = 128
    m.mel_r_min = 32
    m.compute_dtype = "float32"  # CPU: bf16 matmuls are slower than fp32 there
    m.remat = "none"

    d = c.data
    d.manifest = DEMO_MANIFEST
    d.prepared_dir = DEMO_PREPARED
    d.max_seq_length = 64
    d.seq_len = 64
    d.validation_fraction = 0.05
    # The floor rule (at least 32 rows): the reference rule would hold out 16 of the 302
    # calendar rows, too few for a validation loss that is not noise.
    d.holdout = "floor"

    o = c.optim
    o.lr = 1e-3  # from scratch, so far above the recipe's fine-tuning lr
    o.min_lr = 1e-5
    o.warmup_steps = 30

    t = c.train
    t.epochs = 7
    t.log_every = 20
    t.validation_every = 500
    t.checkpoint_every = 1000

    c.eval.retrieval_every = 1000  # nDCG@10 / Recall@100 / MRR@10 on the held-out retrieval pairs
    c.eval.heldout = True
    c.lock()
    return c
