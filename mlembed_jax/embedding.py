"""Pooled embeddings of pre-tokenised texts, from any encoder params, at any MLL exits.

The texts are packed (data/packing.py `plan_batches`: length-sorted first-fit-decreasing,
several texts per row, told apart by segment ids) and run through one jitted forward per
batch shape. encode.py (the Encoder API and CLI) and the evaluation during training (eval/)
both embed through `embed_token_ids`; neither needs the other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from mlembed_jax.data.packing import build_batch, plan_batches
from mlembed_jax.model.encoder import encode, truncate_params
from mlembed_jax.model.kernel_choice import serves

DEFAULT_BATCH_TOKENS = 16384


@functools.partial(jax.jit, static_argnames=("run_cfg",))
def _forward(params, tokens, segment_ids, positions, pool_index, rank, run_cfg):
    """[len(run_cfg.exits), slots, d] float32 pooled (not yet normalised) embeddings.

    run_cfg has num_layers = the deepest exit wanted, so layers past it are never run;
    params may hold more layers and are cut here.
    """
    stacked = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    if stacked != run_cfg.num_layers:
        params = truncate_params(params, run_cfg.num_layers)
    out = encode(params, run_cfg, tokens, segment_ids, positions, pool_index, rank=rank)
    return out["pooled"]


def embed_token_ids(params, cfg, ids: Sequence[np.ndarray], exits: Sequence[int], *,
                    rank: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                    progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Low-level: pooled embeddings of pre-tokenised texts at several exits, no checks.

    params: encoder params (host or device arrays, any sharding); cfg: its EncoderConfig.
    ids: n int arrays, EOS last. exits: layers to pool after (each in [1, cfg.num_layers]);
    only max(exits) layers run. rank: MEL rank (None = r_max / plain embedding).
    Returns [len(exits), n, d] float32, NOT normalised (see `normalize`), in input order.
    A batch whose row length the kernel cannot serve (splash: rows of short texts, shorter
    than 128 tokens) runs with `dense`: the same function (tests/test_attention_kernels.py).
    """
    exits = tuple(int(e) for e in exits)
    depth = max(exits)
    run_cfg = dataclasses.replace(cfg.truncated(depth), exits=exits, remat="none")
    portable_cfg = dataclasses.replace(run_cfg, attention="dense")
    rank_arg = None if (rank is None or not cfg.mel) else np.int32(rank)
    lengths = [len(t) for t in ids]
    out = np.zeros((len(exits), len(ids), cfg.hidden_size), np.float32)
    plans = plan_batches(lengths, batch_tokens)

    def collect(plan, pooled):
        out[:, plan.index] = np.asarray(pooled)[:, :len(plan.index)]
        bar.update(len(plan.index))

    # Empty logical-axis rules: the model's activation constraints become no-ops, so this
    # runs the same inside the training loop's sharding context (on sharded params) as
    # outside it; XLA lays the activations out from the params' shardings.
    with nn.logical_axis_rules(()), tqdm(total=len(ids), desc=desc, unit="text",
                                         disable=not progress, dynamic_ncols=True) as bar:
        pending = None
        for plan in plans:
            arrays = build_batch(plan, ids)
            batch_cfg = run_cfg if serves(run_cfg.attention, plan.seq_len) else portable_cfg
            pooled = _forward(params, arrays["tokens"], arrays["segment_ids"],
                              arrays["positions"], arrays["pool_index"], rank_arg, batch_cfg)
            # Fetch the previous batch only after dispatching this one, so packing the next
            # batch on the host overlaps the device's work.
            if pending is not None:
                collect(*pending)
            pending = (plan, pooled)
        if pending is not None:
            collect(*pending)
    return out


def normalize(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """[..., d] -> [..., dim] float32: the first `dim` dims, L2-normalised (MRL truncation)."""
    x = np.asarray(x, np.float32)
    if dim is not None:
        x = x[..., :dim]
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)
