"""Embeds a few texts with a random tiny encoder: a smoke run until the demo training lands."""

import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax.model.encoder import encode, init_params
from mlembed_jax.model.qwen3 import EncoderConfig, padded_inputs


def main():
    cfg = EncoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=16, mel=True, mel_r_max=32,
                        mel_r_min=8)
    params = init_params(cfg, jax.random.key(0))
    texts = ["hello world", "bonjour le monde", "hola mundo"]
    ids = [list(t.encode()) + [1] for t in texts]  # bytes as token ids, EOS=1 appended
    seq = max(map(len, ids))
    tok = np.zeros((len(ids), seq), np.int32)
    for i, t in enumerate(ids):
        tok[i, :len(t)] = t
    seg, pos, pool = padded_inputs(tok, [len(t) for t in ids])
    out = jax.jit(lambda p, *a: encode(p, cfg, *a, rank=jnp.int32(16)))(params, tok, seg, pos,
                                                                        pool)
    for e, exit_layer in enumerate(cfg.exits):
        print(f"exit {exit_layer}: pooled {out['pooled'][e].shape}")


if __name__ == "__main__":
    main()
