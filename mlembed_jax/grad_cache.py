"""Cached-embedding gradients (GradCache): the step's whole batch at one chunk's activation memory.

The 3D-ML loss sees only pooled embeddings ([exits, texts, d]: every MLL exit is pooled inside
the layer scan), so the step can be split in three:
  1. embed every chunk of the batch with no activations kept (a forward per chunk);
  2. take the full loss (hard, in-batch over the whole global batch, KD) and its gradient
     with respect to those embeddings;
  3. per chunk, run the forward again under `jax.vjp` and pull that chunk's embedding
     gradients back to the parameters, summing over chunks.
The parameter gradients equal the uncached step's (up to fp32 summation order), at the cost of
one extra forward pass; only one chunk's activations are ever live.

Chunks split the step's packs so that every chunk has packs on every device: with D batch
shards holding P/D packs each, chunk c takes packs c*k .. c*k+k-1 of every device's run
(k = P / (D * chunks)). Each device then works on its own packs in every chunk and no pack
moves between devices.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def resolve_chunks(setting: int, packs: int, shards: int) -> int:
    """train.grad_cache_chunks as a step runs it: 0 (off) or k chunks. -1 (auto): one pack
    per device at a time, i.e. packs / shards chunks, or off when that is 1 (nothing to
    save: the plain step is cheaper)."""
    if setting != -1:
        return int(setting)
    per_device = packs // max(shards, 1)
    return per_device if per_device > 1 else 0


def _split(x: jax.Array, shards: int, chunks: int) -> jax.Array:
    """[P * u, ...] (pack-major, u units per pack) -> [chunks, P / chunks * u, ...]."""
    n = x.shape[0] // (shards * chunks)
    y = x.reshape((shards, chunks, n) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1).reshape((chunks, shards * n) + x.shape[1:])
    # Keep each chunk sharded like the batch: every device keeps its own packs.
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))


def chunk_batch(batch: dict, shards: int, chunks: int) -> dict:
    """A packed step batch (batch.py) -> the same arrays with a leading [chunks] axis.

    Token arrays [P*R, S] -> [chunks, P/chunks*R, S]; pack arrays [P, ...] -> [chunks,
    P/chunks, ...]. Chunk c holds packs {d*P/D + c*k + j : d < D, j < k} in that order, so a
    chunk is itself a valid packed batch of P/chunks packs (pool indices are pack-local).
    """
    return {key: _split(x, shards, chunks) for key, x in batch.items()}


def unchunk_texts(x: jax.Array, shards: int, chunks: int) -> jax.Array:
    """Per-chunk pooled texts [chunks, E, P/chunks*T, d] -> [E, P*T, d] in the step's pack
    order (the order `batch.globalize_slots` indexes)."""
    C, E, n, d = x.shape
    y = x.reshape(C, E, shards, n // shards, d).transpose(1, 2, 0, 3, 4)
    return y.reshape(E, C * n, d)


def chunk_texts(x: jax.Array, shards: int, chunks: int) -> jax.Array:
    """The inverse of `unchunk_texts`: [E, P*T, d] -> [chunks, E, P/chunks*T, d]."""
    E, total, d = x.shape
    y = x.reshape(E, shards, chunks, total // (shards * chunks), d).transpose(2, 0, 1, 3, 4)
    return y.reshape(chunks, E, total // chunks, d)


def chunked_forward(forward: Callable, params, chunked: dict) -> jax.Array:
    """forward(params, chunk) -> [E, n, d] for every chunk in turn: [chunks, E, n, d].
    Sequential (lax.map), so only one chunk's activations are live."""
    return jax.lax.map(lambda chunk: forward(params, chunk), chunked)


def cached_value_and_grad(forward: Callable, loss_fn: Callable, params, chunked: dict):
    """((loss, aux), grads) of loss_fn(chunked_forward(forward, params, chunked)).

    forward(params, chunk) -> [E, n, d] pooled embeddings of one chunk. loss_fn(embeddings
    [chunks, E, n, d]) -> (scalar loss, aux). grads has the structure of params and equals
    jax.grad of the composition, computed chunk by chunk (see the module docstring).
    """
    emb = chunked_forward(forward, params, chunked)  # no activations kept: nothing is traced
    (loss, aux), emb_grad = jax.value_and_grad(loss_fn, has_aux=True)(emb)

    def accumulate(total, chunk_and_grad):
        chunk, g = chunk_and_grad
        _, pullback = jax.vjp(lambda p: forward(p, chunk), params)
        (grads,) = pullback(g.astype(emb.dtype))
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (chunked, emb_grad))
    return (loss, aux), grads
