"""The train step: its state, the pure step functions, and the one builder of the jitted,
sharded step that training, the AOT compile and the benchmark all run.

`state -> (state, metrics)` is pure: the step's RNG is folded in from the step number, the MEL
rank is sampled inside the step, and the state is donated so params are updated in place.
A step whose loss or gradient norm is not finite is skipped inside the step: params and
optimizer state stay exactly as they were, the step counter advances (its batch is
consumed), and `metrics["nonfinite"]` is 1. No host sync: the train loop reads the flag with
the other metrics at its log steps.

`build_step(config, mesh, ...)` assembles everything a run's step needs from the config:
model, batch geometries (one per row bucket; packs from the mesh's batch shards), optimizer,
loss options, the KD teacher's shape, the state's abstract shapes and shardings, and the
jitted train and eval steps (one trace per bucket; `compile_train` / `compile_eval` compile
them all before the first step). `tools/aot_compile.py` lowers what it returns on shapes
alone (the largest bucket, for memory); `tools/benchmark.py` times it;
`python -m mlembed_jax.train` runs it.
With LoRA (model.lora.rank > 0, model/lora.py) the state's params are the adapters alone:
the base params are one more argument of the step, like the teacher's, never differentiated
and never updated, so the optimizer state holds only the adapters' moments.
State creation never builds anything whole on one device: random init runs under jit with
the state's out_shardings, and host weights go to devices shard by shard.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlembed_jax.batch import BatchGeometry, geometry_from_config, globalize_slots, row_buckets
from mlembed_jax.config import KD_EXIT_PAIRINGS, ConfigError
from mlembed_jax.grad_cache import (
    cached_value_and_grad,
    chunk_batch,
    chunked_forward,
    resolve_chunks,
    unchunk_texts,
)
from mlembed_jax.loss import (
    config_kwargs,
    in_batch_top1,
    l2_normalize,
    nested_contrastive_loss,
    pack_local_take,
)
from mlembed_jax.model import lora as lora_lib
from mlembed_jax.model.encoder import abstract_params, encode, init_params, param_logical_axes
from mlembed_jax.model.factorized_embed import sample_mel_rank
from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.optim import make_optimizer
from mlembed_jax.recipe import recipe_exits
from mlembed_jax.sharding import (
    activation_rules,
    batch_sharding,
    batch_shards,
    logical_shardings,
    packs_per_step,
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (batches consumed), skipped ones included
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]: the run's base key; step keys are folded in from `step`


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Everything static a step needs: model, geometry, optimiser, loss options, teacher.
    Only the geometry's packs, texts and negatives per pack matter here (they are the same
    in every row bucket); its rows are the largest bucket's."""

    enc: EncoderConfig
    geometry: BatchGeometry
    tx: optax.GradientTransformation
    schedule: Callable
    loss_kwargs: dict
    num_datasets: int | None = None
    teacher: EncoderConfig | None = None
    # For each student exit, the index of its paired exit among teacher.exits.
    teacher_pairs: tuple[int, ...] = ()
    grad_cache_chunks: int = 0  # 0: plain step; k: cached embedding gradients, k chunks
    batch_shards: int = 1  # shards of the batch axes (chunks keep every device busy)
    debug_nan_steps: tuple[int, ...] = ()  # train.debug_nan_steps (test/debug hook)
    # LoRA: params are the adapters, the base params a frozen argument (None = off).
    lora: lora_lib.LoraConfig | None = None


def pooled_embeddings(setup: StepSetup, params, batch, rank, base_params=None):
    """[E, X, d] pooled embeddings; with LoRA `params` are the adapters of `base_params`."""
    if setup.lora is not None:
        if base_params is None:
            raise ValueError("a LoRA step needs the base params (base_params)")
        return lora_lib.encode(base_params, params, setup.lora, setup.enc, batch["tokens"],
                               batch["segment_ids"], batch["positions"], batch["pool_index"],
                               rank=rank)["pooled"]
    return encode(params, setup.enc, batch["tokens"], batch["segment_ids"], batch["positions"],
                  batch["pool_index"], rank=rank)["pooled"]


def _teacher_pooled(setup: StepSetup, teacher_params, batch):
    """[E, X, d_t]: the teacher's pooled embeddings at the exit paired with each of the
    student's E exits (`teacher_config`), or None without a teacher."""
    if setup.teacher is None:
        return None
    out = encode(teacher_params, setup.teacher, batch["tokens"], batch["segment_ids"],
                 batch["positions"], batch["pool_index"])["pooled"]
    pairs = setup.teacher_pairs or tuple(range(out.shape[0]))
    return jax.lax.stop_gradient(out[jnp.asarray(pairs)])


def step_rank(setup: StepSetup, state: TrainState):
    """The MEL rank of this step (None with MEL off), from the step-folded RNG."""
    if not setup.enc.mel:
        return None
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return sample_mel_rank(key, setup.enc.mel_r_min, setup.enc.mel_r_max)


def step_loss(setup: StepSetup, params, batch: dict, teacher_params=None, rank=None,
              base_params=None):
    """(total loss, metrics) of the student `params` on a batch: what train_step
    differentiates. The teacher's embeddings pass through stop_gradient."""
    slots = globalize_slots(batch, setup.geometry)
    teacher = _teacher_pooled(setup, teacher_params, batch)
    pooled = pooled_embeddings(setup, params, batch, rank, base_params)
    return nested_contrastive_loss(pooled, slots, teacher_pooled=teacher,
                                   num_datasets=setup.num_datasets, **setup.loss_kwargs)


def _debug_nan_factor(setup: StepSetup, step):
    """NaN on the steps train.debug_nan_steps lists (1-based), else 1.0; None if unset."""
    if not setup.debug_nan_steps:
        return None
    hit = jnp.any(step + 1 == jnp.asarray(setup.debug_nan_steps, jnp.int32))
    return jnp.where(hit, jnp.float32(jnp.nan), jnp.float32(1.0))


def _chunked_pooled(setup: StepSetup, params, chunked: dict, rank, base_params=None):
    """[E, P*T, d] pooled embeddings of a chunked batch, one chunk's activations at a time."""
    pooled = chunked_forward(lambda p, ch: pooled_embeddings(setup, p, ch, rank, base_params),
                             params, chunked)
    return unchunk_texts(pooled, setup.batch_shards, setup.grad_cache_chunks)


def _chunked_teacher(setup: StepSetup, teacher_params, chunked: dict):
    """[E, P*T, d_t] teacher embeddings of a chunked batch, a chunk at a time (None without
    a teacher): the train and eval steps both read the teacher this way."""
    if setup.teacher is None:
        return None
    t = chunked_forward(lambda p, ch: _teacher_pooled(setup, p, ch), teacher_params, chunked)
    return unchunk_texts(t, setup.batch_shards, setup.grad_cache_chunks)


def loss_and_grads(setup: StepSetup, params, batch: dict, teacher_params=None, rank=None,
                   loss_factor=None, base_params=None):
    """((total loss, metrics), grads) of `step_loss` on a batch: one plain backward pass, or
    with setup.grad_cache_chunks > 0 the cached-embedding gradients of grad_cache.py (the
    same values, at one chunk's activation memory and one extra forward pass).
    loss_factor (a traced scalar or None) multiplies the total inside the differentiated
    function, so a NaN there reaches the gradients as a real one would.
    With LoRA, `params` (and so the grads) are the adapters; base_params is held fixed."""
    def scaled(result):
        total, metrics = result
        return (total if loss_factor is None else total * loss_factor), metrics

    if not setup.grad_cache_chunks:
        return jax.value_and_grad(
            lambda p: scaled(step_loss(setup, p, batch, teacher_params, rank, base_params)),
            has_aux=True)(params)
    shards, chunks = setup.batch_shards, setup.grad_cache_chunks
    chunked = chunk_batch(batch, shards, chunks)
    slots = globalize_slots(batch, setup.geometry)
    teacher = _chunked_teacher(setup, teacher_params, chunked)

    def loss_fn(emb):
        return scaled(nested_contrastive_loss(
            unchunk_texts(emb, shards, chunks), slots, teacher_pooled=teacher,
            num_datasets=setup.num_datasets, **setup.loss_kwargs))

    return cached_value_and_grad(
        lambda p, ch: pooled_embeddings(setup, p, ch, rank, base_params), loss_fn, params,
        chunked)


def train_step(setup: StepSetup, state: TrainState, batch: dict, teacher_params=None,
               base_params=None):
    """One update, or none if the loss or gradient norm is not finite (module docstring).
    With LoRA, state.params are the adapters and base_params the frozen base.
    Returns (new state, metrics: scalars and small arrays, fp32)."""
    rank = step_rank(setup, state)
    (total, metrics), grads = loss_and_grads(setup, state.params, batch, teacher_params, rank,
                                             _debug_nan_factor(setup, state.step), base_params)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                                   new, old)
    metrics = dict(metrics)
    metrics["total"] = total
    metrics["grad_norm"] = grad_norm
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
    metrics["lr"] = jnp.asarray(setup.schedule(state.step), jnp.float32)
    if rank is not None:
        metrics["mel_rank"] = rank
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    return new_state, metrics


def eval_step(setup: StepSetup, params, batch: dict, teacher_params=None, rank=None,
              base_params=None):
    """Loss metrics on a batch at a fixed MEL rank (default r_max), plus retrieval accuracy at
    the last exit and full width: `acc_in_batch` (own positive ranks first among all
    positives of the batch; retrieval samples only, since clustering/classification
    positives repeat across a batch) and `acc_hard` (positive beats every hard negative)."""
    slots = globalize_slots(batch, setup.geometry)
    if setup.grad_cache_chunks:  # the forward a chunk at a time, as the train step does
        chunked = chunk_batch(batch, setup.batch_shards, setup.grad_cache_chunks)
        pooled = _chunked_pooled(setup, params, chunked, rank, base_params)
        teacher = _chunked_teacher(setup, teacher_params, chunked)
    else:
        pooled = pooled_embeddings(setup, params, batch, rank, base_params)
        teacher = _teacher_pooled(setup, teacher_params, batch)
    _, metrics = nested_contrastive_loss(
        pooled, slots, teacher_pooled=teacher, num_datasets=setup.num_datasets,
        **setup.loss_kwargs)
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
    param_sh = logical_shardings(_trained_logical_axes(setup), mesh, rules)
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


def _trained_logical_axes(setup: StepSetup):
    """Logical axes of what the state trains: the params, or with LoRA the adapters."""
    axes = param_logical_axes(setup.enc)
    return axes if setup.lora is None else lora_lib.adapter_logical_axes(axes, setup.lora)


def batch_shardings(mesh: Mesh, rules, geometry: BatchGeometry) -> dict:
    return {k: batch_sharding(mesh, rules, len(shape))
            for k, (shape, _) in geometry.shapes().items()}


def jit_steps(setup: StepSetup, mesh: Mesh, rules, state_sh, teacher_sh=None, base_sh=None):
    """(train_step, eval_step) jitted with explicit shardings; the train state is donated.
    With LoRA both take the base params last: train(s, b, t, base), eval(p, b, t, base)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    b_sh = batch_shardings(mesh, rules, setup.geometry)
    if setup.lora is not None:
        train = jax.jit(
            lambda s, b, t, base: train_step(setup, s, b, t, base),
            in_shardings=(state_sh, b_sh, teacher_sh, base_sh),
            out_shardings=(state_sh, replicated), donate_argnums=(0,))
        evaluate = jax.jit(
            lambda p, b, t, base: eval_step(setup, p, b, t, base_params=base),
            in_shardings=(state_sh.params, b_sh, teacher_sh, base_sh), out_shardings=replicated)
        return train, evaluate
    train = jax.jit(
        lambda s, b, t: train_step(setup, s, b, t),
        in_shardings=(state_sh, b_sh, teacher_sh), out_shardings=(state_sh, replicated),
        donate_argnums=(0,))
    evaluate = jax.jit(
        lambda p, b, t: eval_step(setup, p, b, t),
        in_shardings=(state_sh.params, b_sh, teacher_sh), out_shardings=replicated)
    return train, evaluate


# ------------------------------------------------------------------------------------------
# State creation: abstract first, then materialised already sharded.


def fresh_state(setup: StepSetup, params, seed: int) -> TrainState:
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=setup.tx.init(params), rng=rng)


def _fresh_trained(setup: StepSetup, seed: int):
    """Random params, or with LoRA fresh adapters (B = 0: the step-0 model is the base)."""
    if setup.lora is None:
        return init_params(setup.enc, jax.random.key(seed))
    return lora_lib.init_adapters(abstract_params(setup.enc), setup.lora, jax.random.key(seed))


def abstract_state(setup: StepSetup, seed: int = 0) -> TrainState:
    """ShapeDtypeStructs of the whole state (params, optimizer moments, step, rng)."""
    return jax.eval_shape(lambda: fresh_state(setup, _fresh_trained(setup, seed), seed))


def init_state(setup: StepSetup, state_sh: TrainState, seed: int,
               host_params: dict | None = None) -> TrainState:
    """A sharded train state: random params (host_params None) or the given host params.
    With LoRA: fresh adapters; the base is not state (`BuiltStep.place_base`)."""
    if setup.lora is not None and host_params is not None:
        raise ConfigError(_LORA_NEEDS_BASE)
    if host_params is None:
        make = lambda: fresh_state(setup, _fresh_trained(setup, seed), seed)
        return jax.jit(make, out_shardings=state_sh)()
    params = place_params(host_params, state_sh.params, setup.enc.param_dtype)
    return jax.jit(lambda p: fresh_state(setup, p, seed), out_shardings=state_sh,
                   donate_argnums=0)(params)


def place_params(host_params: dict, shardings, dtype: str):
    """Host numpy params -> global arrays; each process copies only its addressable shards."""
    np_dtype = jnp.dtype(dtype)

    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx].astype(np_dtype))

    return jax.tree_util.tree_map(put, host_params, shardings)


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying `shardings`: an Orbax restore target or an AOT argument."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ------------------------------------------------------------------------------------------
# The one builder.


def teacher_exit_layers(student_exits, student_layers: int, teacher_layers: int,
                        pairing: str = "position"):
    """The teacher layer paired with each student exit (loss.kd_exit_pairing).

    position (the reference): both exit lists deepest first, the student's i-th exit pairs
    with the teacher's i-th, the teacher's list being the recipe's exits for its depth
    (`recipe.recipe_exits`). A 28-layer student's (28, 24, 16, 8, 4, 2, 1) thus reads a
    36-layer teacher at (36, 32, 24, 16, 8, 4, 2). A teacher with fewer exits than the
    student (the reference stops there with an IndexError) gives its shallowest exit to the
    student's exits past the end of its list.
    layer: the student's last layer pairs with the teacher's last layer, every other exit e
    with the teacher's layer e when it has one, else with its last layer.
    Returns the teacher layers in the order of `student_exits`.
    """
    if pairing == "layer":
        return tuple(teacher_layers if e == student_layers else min(e, teacher_layers)
                     for e in student_exits)
    if pairing != "position":
        raise ValueError(f"pairing={pairing!r} must be one of {KD_EXIT_PAIRINGS}")
    teacher_desc = sorted(recipe_exits(teacher_layers), reverse=True)
    rank = {e: i for i, e in enumerate(sorted(student_exits, reverse=True))}
    return tuple(teacher_desc[min(rank[e], len(teacher_desc) - 1)] for e in student_exits)


def pair_teacher(enc: EncoderConfig, teacher: EncoderConfig, pairing: str = "position"):
    """(teacher run at exactly the layers paired with the student's exits, pairs): pairs[i]
    indexes, among the teacher's exits, the one student exit i pairs with."""
    layers = teacher_exit_layers(enc.exits, enc.num_layers, teacher.num_layers, pairing)
    exits = tuple(sorted(set(layers)))
    return dataclasses.replace(teacher, exits=exits), tuple(exits.index(t) for t in layers)


def teacher_config(config, enc: EncoderConfig):
    """(teacher EncoderConfig, pairs) from its HF config.json (no weights read), run in the
    student's compute dtype and attention kernel, at the layers `teacher_exit_layers` pairs
    with the student's exits (loss.kd_exit_pairing); pairs[i] indexes the teacher exit of
    student exit i. (None, ()) without a teacher."""
    if not config.loss.teacher:
        return None, ()
    teacher = encoder_config_from_hf(config.loss.teacher, compute_dtype=enc.compute_dtype,
                                     param_dtype=enc.compute_dtype, attention=enc.attention,
                                     exits=())
    if teacher.vocab_size < enc.vocab_size:
        raise ConfigError(f"teacher {config.loss.teacher!r} has vocab {teacher.vocab_size}, "
                          f"smaller than the student's {enc.vocab_size}; use a teacher with "
                          "the same tokenizer")
    return pair_teacher(enc, teacher, str(config.loss.get("kd_exit_pairing", "position")))


# A LoRA step takes the frozen base as its own argument (BuiltStep.place_base); a caller that
# builds a state from host params or compiles without the base gets this line.
_LORA_NEEDS_BASE = ("model.lora.rank > 0: a LoRA step takes the frozen base params as its last "
                    "argument (BuiltStep.place_base, or abstract_base() to compile on shapes)")


@dataclasses.dataclass
class BuiltStep:
    """A run's step, built once from the config (see `build_step`).

    train(state, batch, teacher_params) -> (state, metrics) and
    eval(params, batch, teacher_params) -> metrics are jitted with explicit shardings;
    call or lower them under `self.rules_context()`. With LoRA (setup.lora) both take the
    frozen base params as one more, last argument, placed by `base_shardings`.
    """

    config: Any
    mesh: Mesh
    rules: Any
    setup: StepSetup
    geometries: tuple  # BatchGeometry per row bucket, fewest rows first
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    state_shardings: TrainState
    batch_shardings: dict
    teacher_shardings: Any  # None without a teacher
    train: Callable
    eval: Callable
    base_shardings: Any = None  # LoRA: the frozen base params' shardings; None without LoRA

    @property
    def geometry(self) -> BatchGeometry:
        """The largest bucket's geometry: the step whose memory a run must have."""
        return self.geometries[-1]

    def rules_context(self):
        return activation_rules(self.mesh, self.rules)

    def abstract_batch(self, geometry: BatchGeometry | None = None) -> dict:
        """ShapeDtypeStructs of a global batch (default: the largest bucket's), with the
        batch shardings."""
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[k])
                for k, (shape, dtype) in (geometry or self.geometry).shapes().items()}

    def _compile(self, fn, first, teacher_params, rows, base_params=None) -> dict:
        if self.setup.lora is not None and base_params is None:
            raise ConfigError(_LORA_NEEDS_BASE)
        extra = () if self.setup.lora is None else (base_params,)
        with self.rules_context():
            lowered = {g.rows_per_pack: fn.lower(first, self.abstract_batch(g), teacher_params,
                                                 *extra)
                       for g in self.geometries if rows is None or g.rows_per_pack in rows}
        # XLA compiles outside the GIL: the buckets compile side by side.
        with concurrent.futures.ThreadPoolExecutor(max(1, len(lowered))) as pool:
            done = {r: pool.submit(low.compile) for r, low in lowered.items()}
            return {r: f.result() for r, f in done.items()}

    def compile_train(self, state, teacher_params=None, rows=None, base_params=None) -> dict:
        """{rows per pack: compiled train step} for the buckets `rows` (default: all).
        Calling a compiled step with another shape is an error, never a recompile.
        base_params: the LoRA base (arrays or `abstract_base()`); unused without LoRA."""
        return self._compile(self.train, state, teacher_params, rows, base_params)

    def compile_eval(self, params, teacher_params=None, rows=None, base_params=None) -> dict:
        """{rows per pack: compiled eval step} for the buckets `rows` (default: all)."""
        return self._compile(self.eval, params, teacher_params, rows, base_params)

    def abstract_base(self):
        """ShapeDtypeStructs of the LoRA base params with their shardings (None without)."""
        if self.setup.lora is None:
            return None
        return with_shardings(abstract_params(self.setup.enc), self.base_shardings)

    def place_base(self, host_params: dict):
        """The LoRA base's host params placed by their shardings, shard by shard."""
        return place_params(host_params, self.base_shardings, self.setup.enc.param_dtype)

    def abstract_teacher(self):
        """ShapeDtypeStructs of the teacher's params (None without a teacher)."""
        if self.setup.teacher is None:
            return None
        return with_shardings(abstract_params(self.setup.teacher), self.teacher_shardings)

    def init_state(self, host_params: dict | None = None) -> TrainState:
        """A fresh sharded state: random params, or `host_params` (e.g. from an HF dir)."""
        return init_state(self.setup, self.state_shardings, int(self.config.train.seed),
                          host_params)

    def load_teacher(self):
        """The teacher's weights placed by their shardings (None without a teacher)."""
        if self.setup.teacher is None:
            return None
        host = load_hf_params(self.config.loss.teacher, self.setup.teacher)
        return place_params(host, self.teacher_shardings, self.setup.teacher.param_dtype)


def build_step(config, mesh: Mesh, *, total_steps: int, num_datasets: int | None = None,
               geometries=None) -> BuiltStep:
    """The run's step for `mesh`, from the config alone (no weights, no data).

    total_steps: the length of the lr schedule (it changes no shape). num_datasets: for the
    per-dataset loss metrics. geometries: the global batch geometry of each row bucket (a
    BatchGeometry or a sequence of them, same packs); by default the config's
    data.rows_per_pack buckets with one pack per batch shard of the mesh
    (data.packs_per_step). Derived buckets (data.rows_per_pack=()) come from the data plan
    (data/plan.py), so they must be passed.
    """
    rules = config.mesh.logical_axis_rules
    if geometries is None:
        packs = packs_per_step(config.data, mesh, rules)
        buckets = row_buckets(config.data) or (None,)
        try:
            geometries = [geometry_from_config(config.data, packs, r) for r in buckets]
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if isinstance(geometries, BatchGeometry):
        geometries = [geometries]
    geometries = tuple(sorted(geometries, key=lambda g: g.rows_per_pack))
    if len({dataclasses.replace(g, rows_per_pack=0) for g in geometries}) != 1:
        raise ValueError(f"the row buckets' geometries differ in more than their rows: "
                         f"{geometries}")
    geometry = geometries[-1]
    shards = batch_shards(mesh, rules)
    chunks = resolve_chunks(int(config.train.get("grad_cache_chunks", 0)), geometry.packs,
                            shards)
    if chunks and geometry.packs % (shards * chunks):
        raise ConfigError(
            f"train.grad_cache_chunks={chunks} needs packs per step divisible by chunks x "
            f"{shards} batch shards, but a step has {geometry.packs} packs; set "
            f"data.packs_per_step to a multiple of {shards * chunks}")
    enc = EncoderConfig.from_config(config.model)
    tx, schedule = make_optimizer(config.optim, total_steps)
    teacher, pairs = teacher_config(config, enc)
    setup = StepSetup(enc=enc, geometry=geometry, tx=tx, schedule=schedule,
                      loss_kwargs=config_kwargs(config.loss, packs=geometry.packs),
                      num_datasets=num_datasets, teacher=teacher, teacher_pairs=pairs,
                      grad_cache_chunks=chunks, batch_shards=shards,
                      debug_nan_steps=tuple(config.train.get("debug_nan_steps", ())),
                      lora=lora_lib.LoraConfig.from_config(config.model))
    abstract = abstract_state(setup, int(config.train.seed))
    state_sh = state_shardings(setup, mesh, rules, abstract)
    teacher_sh = (logical_shardings(param_logical_axes(teacher), mesh, rules)
                  if teacher is not None else None)
    base_sh = (logical_shardings(param_logical_axes(enc), mesh, rules)
               if setup.lora is not None else None)
    train, evaluate = jit_steps(setup, mesh, rules, state_sh, teacher_sh, base_sh)
    return BuiltStep(config=config, mesh=mesh, rules=rules, setup=setup,
                     geometries=geometries, abstract_state=with_shardings(abstract, state_sh),
                     state_shardings=state_sh,
                     batch_shardings=batch_shardings(mesh, rules, geometry),
                     teacher_shardings=teacher_sh, train=train, eval=evaluate,
                     base_shardings=base_sh)

