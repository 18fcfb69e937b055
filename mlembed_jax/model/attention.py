"""Attention over packed rows: the one replaceable piece of the encoder.

Every implementation has the signature

    attn(q, k, v, segment_ids) -> out
    q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads, head_dim],
    segment_ids [batch, seq] int32 (0 = padding), out [batch, seq, heads, head_dim]

and must equal `dense_masked_attention`: a query attends to keys at or before its own column
that carry the same segment id. Texts are contiguous in a row, so column causality inside a
segment is causality by position inside the text. Faster kernels register here by name and
are tested against the dense reference, including that no text sees another.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def packed_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] segment ids -> [batch, 1, seq_q, seq_k] bool: same text and not in the future.

    Padding (segment 0) attends to padding only, which keeps its softmax finite; its outputs
    are never pooled.
    """
    seq = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.arange(seq)[:, None] >= jnp.arange(seq)[None, :]
    return (same & causal)[:, None]


def dense_masked_attention(q, k, v, segment_ids):
    """Reference attention: materialises [batch, heads, seq, seq] logits in fp32."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    groups = h // kv
    # Grouped-query attention without copying k/v: fold the query heads into (kv, group).
    qg = q.reshape(b, s, kv, groups, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    mask = packed_causal_mask(segment_ids)[:, :, None]  # [b, 1, 1, q, s]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, s, h, d)


ATTENTION_IMPLS: dict[str, AttentionFn] = {"dense": dense_masked_attention}


def get_attention(name: str) -> AttentionFn:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; "
                         f"choose one of {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]
