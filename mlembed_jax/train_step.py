"""The train state, and the jitted, sharded train and eval steps.

`state -> (state, metrics)` is pure: the step's RNG is folded in from the step number, the MEL
rank is sampled inside the step, and the state is donated so params are updated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlembed_jax.batch import BatchGeometry, globalize_slots
from mlembed_jax.loss import (in_batch_top1, l2_normalize, nested_contrastive_loss,
                              pack_local_take)
from mlembed_jax.model.encoder import encode, param_logical_axes
from mlembed_jax.model.factorized_embed import sample_mel_rank
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.sharding import batch_sharding, logical_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]: the run's base key; step keys are folded in from `step`


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Everything static a step needs: model, geometry, optimiser, loss options, teacher."""

    enc: EncoderConfig
    geometry: BatchGeometry
    tx: optax.GradientTransformation
    schedule: Callable
    loss_kwargs: dict
    num_datasets: int | None = None
    teacher: EncoderConfig | None = None


def _forward(setup: StepSetup, params, batch, rank):
    return encode(params, setup.enc, batch["tokens"], batch["segment_ids"], batch["positions"],
                  batch["pool_index"], rank=rank)["pooled"]


def _teacher_pooled(setup: StepSetup, teacher_params, batch):
    if setup.teacher is None:
        return None
    out = encode(teacher_params, setup.teacher, batch["tokens"], batch["segment_ids"],
                 batch["positions"], batch["pool_index"])["pooled"][-1]
    return jax.lax.stop_gradient(out)


def step_rank(setup: StepSetup, state: TrainState):
    """The MEL rank of this step (None with MEL off), from the step-folded RNG."""
    if not setup.enc.mel:
        return None
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return sample_mel_rank(key, setup.enc.mel_r_min, setup.enc.mel_r_max)


def step_loss(setup: StepSetup, params, batch: dict, teacher_params=None, rank=None):
    """(total loss, metrics) of the student `params` on a batch: what train_step
    differentiates. The teacher's embeddings pass through stop_gradient."""
    slots = globalize_slots(batch, setup.geometry)
    teacher = _teacher_pooled(setup, teacher_params, batch)
    pooled = _forward(setup, params, batch, rank)
    return nested_contrastive_loss(pooled, slots, teacher_pooled=teacher,
                                   num_datasets=setup.num_datasets, **setup.loss_kwargs)


def train_step(setup: StepSetup, state: TrainState, batch: dict, teacher_params=None):
    """One update. Returns (new state, metrics: scalars and small arrays, fp32)."""
    rank = step_rank(setup, state)
    (_, metrics), grads = jax.value_and_grad(
        lambda p: step_loss(setup, p, batch, teacher_params, rank), has_aux=True)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
    metrics["lr"] = jnp.asarray(setup.schedule(state.step), jnp.float32)
    if rank is not None:
        metrics["mel_rank"] = rank
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(setup: StepSetup, params, batch: dict, teacher_params=None, rank=None):
    """Loss metrics on a batch at a fixed MEL rank (default r_max), plus retrieval accuracy at
    the last exit and full width: `acc_in_batch` (own positive ranks first among all
    positives of the batch; retrieval samples only, since clustering/classification
    positives repeat across a batch) and `acc_hard` (positive beats every hard negative)."""
    slots = globalize_slots(batch, setup.geometry)
    pooled = _forward(setup, params, batch, rank)
    _, metrics = nested_contrastive_loss(
        pooled, slots, teacher_pooled=_teacher_pooled(setup, teacher_params, batch),
        num_datasets=setup.num_datasets, **setup.loss_kwargs)
    # Same lookups and row blocks as the loss, so no device holds every text or [S, S].
    packs = setup.loss_kwargs.get("packs")
    block = int(setup.loss_kwargs.get("in_batch_block_size", 0))
    last = pooled[-1:].astype(jnp.float32)  # [1, X, d]: last exit, full width
    q, p, neg = (l2_normalize(pack_local_take(last, slots[k], 1, packs))
                 for k in ("query_text", "positive_text", "negative_text"))
    valid = slots["sample_valid"]
    hit_ib = in_batch_top1(q, p, valid, block)[0] == jnp.arange(q.shape[1])
    pos_sim = jnp.sum(q * p, axis=-1)[0]  # [S]
    neg_sim = jnp.einsum("esd,esnd->esn", q, neg)[0]  # [S, N]
    hit_hard = jnp.all(jnp.where(slots["negative_valid"], neg_sim < pos_sim[:, None], True), -1)
    n = jnp.maximum(valid.sum(), 1)
    retrieval = valid & slots["in_batch"]
    metrics = dict(metrics)
    metrics["acc_in_batch"] = jnp.sum(hit_ib & retrieval) / jnp.maximum(retrieval.sum(), 1)
    metrics["acc_hard"] = jnp.sum(hit_hard & valid) / n
    # Chance level of the in-batch accuracy: 1 / (valid samples in the batch).
    metrics["acc_in_batch_chance"] = 1.0 / n
    return metrics


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def state_shardings(setup: StepSetup, mesh: Mesh, rules, abstract_state: TrainState):
    """NamedShardings for every leaf of the state: params by the rules table, optimizer
    moments like the param they belong to, everything else (counts, scalars) replicated.

    A moment is matched to its param by the param's path ending its own path, with the same
    shape; this holds however optax nests its state (chain, multi_transform masks, ...).
    """
    param_sh = logical_shardings(param_logical_axes(setup.enc), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {}
    for path, sh in jax.tree_util.tree_leaves_with_path(param_sh):
        by_path[_path_keys(path)] = sh
    shapes = {_path_keys(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(abstract_state.params)}

    def moment_sharding(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and shapes[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(moment_sharding, abstract_state.opt_state)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def batch_shardings(mesh: Mesh, geometry: BatchGeometry) -> dict:
    return {k: batch_sharding(mesh, len(shape)) for k, (shape, _) in geometry.shapes().items()}


def jit_steps(setup: StepSetup, mesh: Mesh, state_sh, teacher_sh=None):
    """(train_step, eval_step) jitted with explicit shardings; the train state is donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    b_sh = batch_shardings(mesh, setup.geometry)
    train = jax.jit(
        lambda s, b, t: train_step(setup, s, b, t),
        in_shardings=(state_sh, b_sh, teacher_sh), out_shardings=(state_sh, replicated),
        donate_argnums=(0,))
    evaluate = jax.jit(
        lambda p, b, t: eval_step(setup, p, b, t),
        in_shardings=(state_sh.params, b_sh, teacher_sh), out_shardings=replicated)
    return train, evaluate
