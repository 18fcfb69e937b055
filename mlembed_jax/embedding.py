"""Pooled embeddings of pre-tokenised texts, from any encoder params, at any MLL exits.

The texts are packed (data/packing.py `plan_batches`: several texts per row, told apart by
segment ids, rows filled nearly full) and run through one jitted forward per batch shape.
encode.py (the Encoder API and CLI), the evaluation (eval/) and the hard-negative miner
(mining.py) all embed through `embed_token_ids`.

Devices: each forward runs one pack per shard of the mesh's batch axes (the rules table's
"batch"), so every device of the mesh embeds its own pack. By default the mesh is the one
the params already live on (the training mesh, during training), else all local devices on
the data axis with the params replicated (`local_mesh`): encoding a corpus uses every
local GPU or TPU core with no setting.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mlembed_jax.config import DEFAULT_LOGICAL_AXIS_RULES
from mlembed_jax.data.packing import BatchPlan, build_batch, plan_batches
from mlembed_jax.model.encoder import encode, truncate_params
from mlembed_jax.model.kernel_choice import serves
from mlembed_jax.sharding import (
    activation_rules,
    batch_sharding,
    batch_shards,
    make_mesh,
    rules_list,
)

DEFAULT_BATCH_TOKENS = 16384  # per pack, i.e. per device of the batch axes


def local_mesh(devices=None) -> Mesh:
    """All local devices (or `devices`) on the data axis: one pack per device."""
    devices = list(jax.local_devices() if devices is None else devices)
    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "num_devices": -1}, devices)


def params_mesh(params) -> Mesh | None:
    """The mesh the params are laid out on (None for host arrays or single-device ones)."""
    leaves = jax.tree_util.tree_leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def replicate(params, mesh: Mesh):
    """params with every leaf on every device of `mesh` (unchanged if already on it)."""
    if params_mesh(params) == mesh:
        return params
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=8)
def _forward_fn(mesh: Mesh, rules: tuple):
    """The jitted forward for one (mesh, rules): compiled shapes are cached per pair, so a
    trace made under one rules table is never reused under another."""
    replicated = NamedSharding(mesh, PartitionSpec())

    @functools.partial(jax.jit, static_argnames=("run_cfg",), out_shardings=replicated)
    def forward(params, tokens, segment_ids, positions, pool_index, rank, run_cfg):
        """[len(run_cfg.exits), packs * slots, d] float32 pooled (not yet normalised).

        run_cfg has num_layers = the deepest exit wanted, so layers past it are never run;
        params may hold more layers and are cut here. The result is replicated: small, and
        readable on every process.
        """
        stacked = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
        if stacked != run_cfg.num_layers:
            params = truncate_params(params, run_cfg.num_layers)
        out = encode(params, run_cfg, tokens, segment_ids, positions, pool_index, rank=rank)
        return out["pooled"]

    return forward


def group_plans(plans: list[BatchPlan], packs: int) -> list[list[BatchPlan]]:
    """Consecutive plans (plan_batches' order) in groups of up to `packs` plans with one
    seq_len: one forward per group, one plan per device. Only the group at the end of a
    seq_len's run can be short (its missing packs are empty), so few forwards leave devices
    idle."""
    groups: list[list[BatchPlan]] = []
    for plan in plans:
        if groups and len(groups[-1]) < packs and groups[-1][0].seq_len == plan.seq_len:
            groups[-1].append(plan)
        else:
            groups.append([plan])
    return groups


def _group_arrays(group: list[BatchPlan], packs: int, ids) -> tuple[dict, int]:
    """The stacked arrays of a group: tokens, segment_ids, positions [packs * R, S] and
    pool_index [packs, slots], R and slots the group's largest. Returns (arrays, slots)."""
    rows = max(p.num_rows for p in group)
    slots = max(p.num_slots for p in group)
    seq = group[0].seq_len
    built = [build_batch(p, ids, rows, slots) for p in group]
    empty = {"tokens": np.zeros((rows, seq), np.int32), "pool_index": np.zeros((1, slots),
                                                                               np.int32)}
    empty["segment_ids"] = empty["positions"] = empty["tokens"]
    built += [empty] * (packs - len(group))
    return {k: np.concatenate([b[k] for b in built]) for k in built[0]}, slots


def _global(arr: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) -> a global array laid out by `sharding`."""
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def embed_token_ids(params, cfg, ids: Sequence[np.ndarray], exits: Sequence[int], *,
                    rank: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                    progress: bool = False, desc: str = "encode", mesh: Mesh | None = None,
                    rules=DEFAULT_LOGICAL_AXIS_RULES) -> np.ndarray:
    """Low-level: pooled embeddings of pre-tokenised texts at several exits, no checks.

    params: encoder params (host or device arrays, any sharding); cfg: its EncoderConfig.
    ids: n int arrays, EOS last. exits: layers to pool after (each in [1, cfg.num_layers]);
    only max(exits) layers run. rank: MEL rank (None = r_max / plain embedding).
    batch_tokens: tokens per pack, one pack per device of the batch axes.
    mesh: where to run (default: the params' mesh, else `local_mesh()`; params not on it
    are replicated onto it for this call). rules: the logical-axis rules table; its "batch"
    axes say how many packs a forward holds. Every process of a multi-process mesh must
    pass the same ids. progress: a tqdm bar with texts/s.
    Returns [len(exits), n, d] float32, NOT normalised (see `normalize`), in input order.
    A batch whose row length the kernel cannot serve (splash: rows of short texts, shorter
    than 128 tokens) runs with `dense`: the same function (tests/test_attention_kernels.py).
    """
    exits = tuple(int(e) for e in exits)
    depth = max(exits)
    run_cfg = dataclasses.replace(cfg.truncated(depth), exits=exits, remat="none")
    portable_cfg = dataclasses.replace(run_cfg, attention="dense")
    rank_arg = None if (rank is None or not cfg.mel) else np.int32(rank)
    mesh = mesh or params_mesh(params) or local_mesh()
    params = replicate(params, mesh)
    rules = tuple(rules_list(rules))
    packs = batch_shards(mesh, rules)
    forward = _forward_fn(mesh, rules)
    sharding = batch_sharding(mesh, rules, 2)  # every array: packs on the leading dim
    out = np.zeros((len(exits), len(ids), cfg.hidden_size), np.float32)
    groups = group_plans(plan_batches([len(t) for t in ids], batch_tokens), packs)

    def collect(group, slots, pooled):
        pooled = np.asarray(pooled)
        for p, plan in enumerate(group):
            out[:, plan.index] = pooled[:, p * slots:p * slots + len(plan.index)]
        bar.update(sum(len(plan.index) for plan in group))

    with activation_rules(mesh, rules), tqdm(total=len(ids), desc=desc, unit="text",
                                             disable=not progress, dynamic_ncols=True) as bar:
        pending = None
        for group in groups:
            arrays, slots = _group_arrays(group, packs, ids)
            seq = group[0].seq_len
            batch_cfg = run_cfg if serves(run_cfg.attention, seq) else portable_cfg
            pooled = forward(params, *(_global(arrays[k], sharding) for k in (
                "tokens", "segment_ids", "positions", "pool_index")), rank_arg, batch_cfg)
            # Fetch the previous group only after dispatching this one, so packing the next
            # group on the host overlaps the devices' work.
            if pending is not None:
                collect(*pending)
            pending = (group, slots, pooled)
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
