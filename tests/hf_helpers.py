"""Tiny random HF Qwen3 models, built with `transformers` itself and saved to disk."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
            rms_norm_eps=1e-6, max_position_embeddings=256, eos_token_id=1, pad_token_id=0,
            bos_token_id=None)


def make_hf_qwen3(out_dir, *, tied=True, causal_lm=False, max_shard_size=None, seed=0, **kw):
    """Saves a random Qwen3 (fp32) to out_dir and returns the torch model (eval mode)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**{**TINY, **kw}, tie_word_embeddings=tied)
    cls = transformers.Qwen3ForCausalLM if causal_lm else transformers.Qwen3Model
    model = cls(cfg).eval()
    # Random init leaves norms at 1.0; perturb them so a missed norm weight cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kw)
    return model.model if causal_lm else model
