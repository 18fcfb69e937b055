"""Tests of the nested 3D-ML loss (mlembed_jax.loss) against hand values and a NumPy loop."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlembed_jax import loss as L
from mlembed_jax.batch import BatchGeometry, globalize_slots
from mlembed_jax.config import base_config
from mlembed_jax.recipe import mrl_dims, mrl_weights

# jit everything: op-by-op dispatch of the loss is slow and would dominate the test time.
loss_jit = jax.jit(L.nested_contrastive_loss,
                   static_argnames=("mrl_min_dim", "in_batch_block_size", "num_datasets",
                                    "in_batch_gradient"))


def softplus(x):
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------
# MRL dims and weights


def test_mrl_dims_and_weights():
    assert mrl_dims(64) == (64, 32, 16, 8)
    # 48 is not a power of two: {8, 16, 32} below it, plus 48 itself.
    assert mrl_dims(48) == (48, 32, 16, 8)
    assert mrl_dims(1024, 256) == (1024, 512, 256)
    assert mrl_dims(8) == (8,)
    assert mrl_dims(64, 0) == (64,)  # MRL off
    # n = 1, 2, 3, 4 from the largest dim; weight 1 / (n sqrt(d / m)).
    w = dict(mrl_weights(64))
    np.testing.assert_allclose(
        [w[64], w[32], w[16], w[8]],
        [1.0, 1 / (2 * math.sqrt(2)), 1 / (3 * 2), 1 / (4 * math.sqrt(8))])
    w = dict(mrl_weights(48))
    np.testing.assert_allclose(
        [w[48], w[32], w[16], w[8]],
        [1.0, 1 / (2 * math.sqrt(1.5)), 1 / (3 * math.sqrt(3)), 1 / (4 * math.sqrt(6))])


# ----------------------------------------------------------------------------------------
# Hand-computed values: d = 2, mrl_min_dim = 1 -> dims (2, 1) with weights 1 and
# w1 = 1 / (2 sqrt(2 / 1)) = 0.353553. Temperature 1 so logits are plain cosines.


def _hand_case():
    nan = float("nan")
    exit0 = [
        [1.0, 0.0],   # t0 query of s0
        [1.0, 1.0],   # t1 positive of s0
        [-1.0, 1.0],  # t2 hard negative of s0
        [-1.0, 0.0],  # t3 query of s1
        [-2.0, 0.0],  # t4 positive of s1 (scale must not matter)
        [nan, nan],   # t5 invalid text: garbage that must never leak
    ]
    # Exit 1: every valid text is (3, 4), so every cosine is 1 at both dims.
    exit1 = [[3.0, 4.0]] * 5 + [[nan, nan]]
    pooled = np.array([exit0, exit1], np.float32)  # [E=2, X=6, d=2]
    slots = {
        "query_text": np.array([0, 3, 0], np.int32),
        "positive_text": np.array([1, 4, 0], np.int32),
        # s0's 2nd negative is its own positive and its 3rd the NaN text: both flagged
        # invalid, so they must drop out (not count as zero logits).
        "negative_text": np.array([[2, 1, 5], [0, 0, 0], [0, 0, 0]], np.int32),
        "negative_valid": np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]], bool),
        "sample_valid": np.array([1, 1, 0], bool),  # s2 is an empty slot
        "in_batch": np.array([1, 0, 1], bool),      # s1 is not retrieval
        "dataset_id": np.array([0, 1, 0], np.int32),
        "text_valid": np.array([1, 1, 1, 1, 1, 0], bool),
    }
    return pooled, slots


def test_hand_computed_values():
    pooled, slots = _hand_case()
    total, m = loss_jit(
        jnp.asarray(pooled), slots, temperature=1.0, mrl_min_dim=1, num_datasets=2)
    w1 = 1 / (2 * math.sqrt(2))
    a = 1 / math.sqrt(2)
    # Exit 0, hard. s0 at d=2: pos cos(t0,t1) = 1/sqrt2, neg cos(t0,t2) = -1/sqrt2,
    #   CE = log(e^a + e^-a) - a = softplus(-2a) = softplus(-sqrt2) = 0.217622.
    #   s0 at d=1: (1) vs (1) -> 1, (1) vs (-1) -> -1: CE = softplus(-2) = 0.126928.
    #   s1 has no valid negative: CE over [pos] alone = 0. Mean over the 2 valid samples.
    hard0 = softplus(-math.sqrt(2)) / 2 + w1 * softplus(-2) / 2  # = 0.131249
    # Exit 0, in-batch. Rows: s0 only (s1 not retrieval, s2 empty). Columns: positives of all
    #   valid samples, t1 and t4. d=2: cos(t0,t1) = a, cos(t0,t4) = -1:
    #   CE = log(e^a + e^-1) - a = softplus(-1 - a) = 0.166692. d=1: 1 vs -1: softplus(-2).
    inb0 = softplus(-1 - a) + w1 * softplus(-2)  # = 0.211567
    # Exit 1: all cosines 1. hard s0: log(e + e) - 1 = log 2, s1: 0 -> mean log2 / 2.
    #   in-batch s0 over 2 columns: log 2. Both at both dims, weights 1 + w1.
    hard1 = (1 + w1) * math.log(2) / 2  # = 0.469106
    inb1 = (1 + w1) * math.log(2)  # = 0.938212
    # Exits are summed, then divided by the number of exits (2).
    np.testing.assert_allclose(m["hard_per_exit"], [hard0, hard1], rtol=1e-6)
    np.testing.assert_allclose(m["in_batch_per_exit"], [inb0, inb1], rtol=1e-6)
    np.testing.assert_allclose(m["hard"], (hard0 + hard1) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["in_batch"], (inb0 + inb1) / 2, rtol=1e-6)
    np.testing.assert_allclose(total, (hard0 + inb0 + hard1 + inb1) / 2, rtol=1e-6)  # 0.875067
    assert total.dtype == jnp.float32
    assert (int(m["num_samples"]), int(m["num_in_batch"]), int(m["num_negatives"]),
            int(m["num_texts"])) == (2, 1, 1, 5)
    # Per sample (exit-averaged): s0 has both parts at full weight, s1 only its hard CE = 0.
    s0 = ((softplus(-math.sqrt(2)) + softplus(-1 - a) + w1 * 2 * softplus(-2))
          + (1 + w1) * 2 * math.log(2)) / 2
    np.testing.assert_allclose(m["sample_loss"], [s0, 0.0, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m["dataset_loss"], [s0, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(m["dataset_samples"], [1, 1])

    # Gradients are finite and never reach the invalid text.
    g = jax.jit(jax.grad(lambda x: L.nested_contrastive_loss(
        x, slots, temperature=1.0, mrl_min_dim=1)[0]))(jnp.asarray(pooled))
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[:, 5], 0.0)


def test_hand_temperature_and_single_dim():
    pooled, slots = _hand_case()
    # Only exit 0, MRL off (dim 2 only), temperature 0.5: logits are cosines * 2.
    _, m = loss_jit(jnp.asarray(pooled[:1]), slots, temperature=0.5, mrl_min_dim=0)
    a = 1 / math.sqrt(2)
    # hard s0: softplus(-2 * 2a) = softplus(-2 sqrt2) = 0.057232; s1: 0; mean over 2.
    np.testing.assert_allclose(m["hard"], softplus(-2 * math.sqrt(2)) / 2, rtol=1e-6)
    # in-batch s0: columns 2a and -2 -> softplus(-2 - 2a) = 0.032352.
    np.testing.assert_allclose(m["in_batch"], softplus(-2 - 2 * a), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Random packed batches and an independent NumPy reference.


def make_batch(rng, packs=4, texts=16, samples=3, negs=3):
    """A random pack-local batch (slot fields only) with empty and partial slots."""
    geo = BatchGeometry(packs=packs, rows_per_pack=1, seq_len=8, texts_per_pack=texts,
                        samples_per_pack=samples, max_negatives=negs)
    b = geo.empty()
    for p in range(packs):
        free = list(rng.permutation(texts))  # text slots used in a random order
        for s in range(samples):
            k = int(rng.integers(0, negs + 1))  # valid negatives of this sample
            if rng.random() < 0.2 or len(free) < 2 + k:
                continue  # empty sample slot
            b["query_text"][p, s], b["positive_text"][p, s] = free.pop(), free.pop()
            for j in range(k):
                b["negative_text"][p, s, j] = free.pop()
                b["negative_valid"][p, s, j] = True
            b["sample_valid"][p, s] = True
            b["in_batch"][p, s] = rng.random() < 0.6
            b["dataset_id"][p, s] = rng.integers(0, 3)
        for s in range(samples):
            if b["sample_valid"][p, s]:
                b["text_valid"][p, b["query_text"][p, s]] = True
                b["text_valid"][p, b["positive_text"][p, s]] = True
                for j in range(negs):
                    if b["negative_valid"][p, s, j]:
                        b["text_valid"][p, b["negative_text"][p, s, j]] = True
    return b, geo


def reference_loss(pooled, slots, tau, min_dim, teacher=None, kd_weight=0.0):
    """Straightforward float64 loops over exits, dims and samples, written from the recipe."""
    pooled = np.asarray(pooled, np.float64)
    s = {k: np.asarray(v) for k, v in slots.items()}
    E, X, d = pooled.shape
    dims = sorted({d} | {min_dim * 2**k for k in range(40) if min_dim * 2**k < d},
                  reverse=True)

    def cos(a, b):
        return float(np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b))))

    def ce(logits, target):
        mx = max(logits)
        return mx + math.log(sum(math.exp(v - mx) for v in logits)) - logits[target]

    valid = [i for i in range(len(s["sample_valid"])) if s["sample_valid"][i]]
    hard_e, inb_e, kd_e = [], [], []
    for e in range(E):
        hard_sum = inb_sum = 0.0
        for n, m in enumerate(dims, start=1):
            w = 1.0 / (n * math.sqrt(d / m))
            emb = lambda t: pooled[e, t, :m]
            hard = []
            for i in valid:
                q = emb(s["query_text"][i])
                logits = [cos(q, emb(s["positive_text"][i])) / tau]
                for j in range(s["negative_text"].shape[1]):
                    if s["negative_valid"][i, j]:
                        logits.append(cos(q, emb(s["negative_text"][i, j])) / tau)
                hard.append(ce(logits, 0))
            inb = []
            for i in valid:
                if not s["in_batch"][i]:
                    continue
                q = emb(s["query_text"][i])
                logits = [cos(q, emb(s["positive_text"][c])) / tau for c in valid]
                inb.append(ce(logits, valid.index(i)))
            hard_sum += w * (sum(hard) / len(hard) if hard else 0.0)
            inb_sum += w * (sum(inb) / len(inb) if inb else 0.0)
        hard_e.append(hard_sum)
        inb_e.append(inb_sum)
        if teacher is None:
            kd_e.append(0.0)
        else:  # MSE(queries) + MSE(positives) + MSE(negatives), each over its own group
            width = min(d, teacher.shape[-1])

            def sq(t):
                return float(np.sum((pooled[e, t, :width] - teacher[e, t, :width]) ** 2))

            groups = [[s["query_text"][i] for i in valid], [s["positive_text"][i] for i in valid],
                      [s["negative_text"][i, j] for i in valid
                       for j in range(s["negative_text"].shape[1]) if s["negative_valid"][i, j]]]
            kd_e.append(sum(sum(sq(t) for t in g) / (len(g) * width) for g in groups if g))
    total = (sum(hard_e) + sum(inb_e) + kd_weight * sum(kd_e)) / E
    return total, np.array(hard_e), np.array(inb_e), np.array(kd_e)


@pytest.mark.parametrize("teacher_dim", [None, 40, 20])
def test_matches_numpy_reference(teacher_dim):
    rng = np.random.default_rng(teacher_dim or 0)
    b, geo = make_batch(rng)
    slots = globalize_slots(b, geo)
    E, d = 3, 32  # dims 32, 16, 8
    X = geo.packs * geo.texts_per_pack
    pooled = rng.normal(size=(E, X, d)).astype(np.float32)
    teacher = None if teacher_dim is None else rng.normal(size=(E, X, teacher_dim)).astype(
        np.float32)
    kd_weight = 0.0 if teacher is None else 0.3
    total, m = jax.jit(functools.partial(
        L.nested_contrastive_loss, temperature=0.05, mrl_min_dim=8, kd_weight=kd_weight))(
            pooled, slots, teacher_pooled=teacher)
    ref_total, ref_hard, ref_inb, ref_kd = reference_loss(
        pooled, slots, 0.05, 8, teacher, kd_weight)
    # The batch exercises what it should: empty slots, mixed in-batch, partial negatives.
    assert 0 < int(m["num_in_batch"]) < int(m["num_samples"]) < b["sample_valid"].size
    assert 0 < int(m["num_negatives"]) < b["negative_valid"].size
    np.testing.assert_allclose(m["hard_per_exit"], ref_hard, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["in_batch_per_exit"], ref_inb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["kd_per_exit"], ref_kd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        m["total"], m["hard"] + m["in_batch"] + kd_weight * m["kd"], rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Sharding and blocking


def _random_inputs(seed, packs=8, E=2, d=16):
    rng = np.random.default_rng(seed)
    b, geo = make_batch(rng, packs=packs, texts=12, samples=2, negs=3)
    slots = {k: np.asarray(v) for k, v in globalize_slots(b, geo).items()}
    pooled = rng.normal(size=(E, packs * geo.texts_per_pack, d)).astype(np.float32)
    return pooled, slots


@functools.lru_cache(maxsize=None)
def _loss_and_grad(block_sizes):
    """One jitted function giving ((total, metrics), grad) for each in-batch block size.

    Several block sizes share one compile, which keeps the tests fast.
    """

    def f(pooled, slots, bs):
        return L.nested_contrastive_loss(pooled, slots, mrl_min_dim=4, in_batch_block_size=bs)

    return jax.jit(lambda pooled, slots: tuple(
        jax.value_and_grad(f, has_aux=True)(pooled, slots, bs) for bs in block_sizes))


def _assert_same(got, want):
    (t, m), g = got
    (t0, m0), g0 = want
    np.testing.assert_allclose(m["in_batch_per_exit"], m0["in_batch_per_exit"], rtol=1e-6)
    np.testing.assert_allclose(m["hard_per_exit"], m0["hard_per_exit"], rtol=1e-6)
    np.testing.assert_allclose(t, t0, rtol=1e-6)
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)


def test_sharded_equals_single_device():
    pooled, slots = _random_inputs(1)  # 8 packs: one per device, 16 sample slots
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("data",))
    row = lambda a: NamedSharding(mesh, P("data", *([None] * (a.ndim - 1))))
    pooled_sh = jax.device_put(pooled, NamedSharding(mesh, P(None, "data", None)))
    slots_sh = {k: jax.device_put(v, row(v)) for k, v in slots.items()}
    assert len(pooled_sh.sharding.device_set) == 8

    one = devices[0]
    (want,) = _loss_and_grad((0,))(jax.device_put(pooled, one), jax.device_put(slots, one))
    assert int(want[0][1]["num_in_batch"]) > 2
    # Unblocked; blocks of 8 (each block spans all devices); blocks of 3 (padded last block).
    for got in _loss_and_grad((0, 8, 3))(pooled_sh, slots_sh):
        assert got[1].sharding.is_equivalent_to(pooled_sh.sharding, 3)  # grad stays sharded
        _assert_same(got, want)


def test_blocked_in_batch_equals_unblocked():
    pooled, slots = _random_inputs(2)  # 16 sample slots; 5 leaves a padded last block
    want, *got = _loss_and_grad((0, 1, 5, 16, 1000))(pooled, slots)
    assert int(want[0][1]["num_in_batch"]) > 2
    for g in got:
        _assert_same(g, want)


def test_blocked_in_batch_does_not_materialise_the_full_matrix():
    # Compile only (no run) a loss+grad over 2048 samples; with blocks of 128 rows the
    # compiled step's scratch memory must stay well below one [E, S, S] fp32 logits matrix
    # (the unblocked version needs several of them).
    S, E, d = 2048, 2, 16
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    slots = {
        "query_text": spec((S,), jnp.int32), "positive_text": spec((S,), jnp.int32),
        "negative_text": spec((S, 1), jnp.int32), "negative_valid": spec((S, 1), bool),
        "sample_valid": spec((S,), bool), "in_batch": spec((S,), bool),
        "dataset_id": spec((S,), jnp.int32), "text_valid": spec((3 * S,), bool),
    }
    f = jax.jit(jax.value_and_grad(lambda x, s: L.nested_contrastive_loss(
        x, s, in_batch_block_size=128)[0]))
    compiled = f.lower(spec((E, 3 * S, d), jnp.float32), slots).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < E * S * S * 4 / 2


# ----------------------------------------------------------------------------------------
# Knowledge distillation


def test_kd_zero_for_identical_teacher_and_no_teacher_gradient():
    pooled, slots = _random_inputs(4, packs=2, E=3)
    student = jnp.asarray(pooled)  # [3, 24, 16]
    invalid = int(np.flatnonzero(~slots["text_valid"])[0])
    other = student + 0.5
    teachers = {
        "same": student,  # the student itself at every exit
        # wider, first 16 dims = the student's: cut to the student's 16 dims
        "wide": jnp.concatenate([student, jnp.ones(student.shape[:2] + (8,))], axis=2),
        "narrow": student[..., :8],  # narrower: the student is cut to 8 dims
        "last_only": student.at[:-1].add(1.0),  # equal at the last exit only
        "other": other,
        "other_bad_invalid": other.at[:, invalid].set(1e6),  # only an invalid text differs
    }

    def f(student, teacher):
        return L.nested_contrastive_loss(student, slots, mrl_min_dim=4, kd_weight=1.0,
                                         teacher_pooled=teacher)

    @jax.jit  # one compile for all cases
    def run(student, teachers):
        grads = jax.grad(lambda s, t: f(s, t)[0], argnums=(0, 1))(student, teachers["other"])
        return {k: f(student, t) for k, t in teachers.items()}, grads

    out, (g_student, g_teacher) = run(student, teachers)
    kd = {k: np.asarray(m["kd_per_exit"]) for k, (_, m) in out.items()}
    for k in ("same", "wide", "narrow"):
        np.testing.assert_array_equal(kd[k], 0.0, err_msg=k)
    # Exit by exit: only the exits where the teacher differs have KD.
    assert kd["last_only"][-1] == 0.0 and (kd["last_only"][:-1] > 0).all()
    # An offset of 0.5 in every dim: each group's MSE is 0.25, three groups per exit.
    np.testing.assert_allclose(kd["other"], 0.75, rtol=1e-6)
    total, m = out["other"]
    np.testing.assert_allclose(m["kd"], 0.75, rtol=1e-6)  # mean over exits of the sum
    np.testing.assert_allclose(total, m["hard"] + m["in_batch"] + m["kd"], rtol=1e-6)
    # Only valid texts count.
    np.testing.assert_allclose(kd["other_bad_invalid"], kd["other"], rtol=1e-6)
    # The teacher is frozen; the student does get a gradient.
    np.testing.assert_array_equal(g_teacher, 0.0)
    assert np.abs(np.asarray(g_student)).sum() > 0
    with pytest.raises(ValueError, match="one teacher exit per student exit"):
        f(student, student[-1])


# ----------------------------------------------------------------------------------------
# Empty batches, dtypes, config


@pytest.mark.parametrize("block_size", [0, 3])
def test_all_empty_batch_is_finite_and_zero(block_size):
    geo = BatchGeometry(packs=2, rows_per_pack=1, seq_len=8, texts_per_pack=6,
                        samples_per_pack=2, max_negatives=2)
    slots = globalize_slots(geo.empty(), geo)
    pooled = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, 16)), jnp.float32)
    teacher = pooled + 1.0

    def f(x):
        return L.nested_contrastive_loss(x, slots, mrl_min_dim=4, kd_weight=1.0,
                                         teacher_pooled=teacher,
                                         in_batch_block_size=block_size, num_datasets=3)

    (total, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(pooled)
    assert float(total) == 0.0
    for k in ("hard", "in_batch", "kd", "num_samples", "num_texts"):
        assert float(m[k]) == 0.0
    np.testing.assert_array_equal(m["dataset_loss"], 0.0)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g, 0.0)
    # Zero embeddings (what an empty slot might hold) stay finite too.
    (_, _), g0 = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.zeros_like(pooled))
    assert np.isfinite(g0).all()


def test_bf16_input_is_computed_in_fp32():
    pooled, slots = _random_inputs(6, packs=2)
    lo = jnp.asarray(pooled, jnp.bfloat16)
    f = lambda x: L.nested_contrastive_loss(x, slots, mrl_min_dim=4)[0]
    t_lo, t_up, g = jax.jit(lambda x: (f(x), f(x.astype(jnp.float32)), jax.grad(f)(x)))(lo)
    assert t_lo.dtype == jnp.float32
    np.testing.assert_allclose(t_lo, t_up, rtol=1e-6)  # same once the input is upcast
    assert g.dtype == jnp.bfloat16


def test_config_fields():
    c = base_config()
    kw = L.config_kwargs(c.loss)
    assert kw == dict(temperature=0.05, mrl_min_dim=8, kd_weight=0.0, in_batch_block_size=0,
                      in_batch_gradient="queries")
    pooled, slots = _random_inputs(7, packs=2)
    total, _ = loss_jit(pooled, slots, **kw)
    assert np.isfinite(float(total))


# ----------------------------------------------------------------------------------------
# Gradients against a NumPy oracle: central differences of a float64 loss written from the
# recipe (vectorised, so hundreds of evaluations stay cheap).


def numpy_loss(x, s, tau, min_dim, teacher=None, kd_weight=0.0, columns=None):
    """The total loss in float64. `columns`: the embeddings the in-batch term takes its
    positives (columns and target) from; None = x itself. Finite differences of x with
    columns fixed give the queries-only in-batch gradient."""
    E, X, d = x.shape
    cols = x if columns is None else columns
    qt, pt, nt = s["query_text"], s["positive_text"], s["negative_text"]
    tv = s["text_valid"]
    valid = s["sample_valid"] & tv[qt] & tv[pt]
    neg_ok = s["negative_valid"] & tv[nt] & valid[:, None]
    rows = valid & s["in_batch"]
    dims = mrl_dims(d, min_dim)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    def lse(a):
        mx = np.max(a, axis=-1, keepdims=True)
        return (mx + np.log(np.sum(np.exp(a - mx), axis=-1, keepdims=True)))[..., 0]

    total = 0.0
    for e in range(E):
        for n, m in enumerate(dims, start=1):
            w = 1.0 / (n * math.sqrt(d / m))
            q, p, ng = unit(x[e, qt, :m]), unit(x[e, pt, :m]), unit(x[e, nt, :m])
            pc = unit(cols[e, pt, :m])
            pos = np.sum(q * p, -1) / tau
            neg = np.where(neg_ok, np.einsum("sm,snm->sn", q, ng) / tau, -np.inf)
            hard = lse(np.concatenate([pos[:, None], neg], 1)) - pos
            ib = np.where(valid[None, :], q @ pc.T / tau, -np.inf)
            inb = lse(ib) - np.diag(ib)
            total += w * (hard[valid].mean() + (inb[rows].mean() if rows.any() else 0.0))
        if teacher is not None:
            width = min(d, teacher.shape[-1])
            err = np.sum((x[e, :, :width] - teacher[e, :, :width]) ** 2, -1)  # [X]
            total += kd_weight * (err[qt][valid].sum() / (valid.sum() * width)
                                  + err[pt][valid].sum() / (valid.sum() * width)
                                  + err[nt][neg_ok].sum() / (neg_ok.sum() * width))
    return total / E


@pytest.mark.parametrize("in_batch_gradient", ["full", "queries"])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_gradients_match_numpy_oracle(in_batch_gradient, with_teacher):
    rng = np.random.default_rng(3)  # 6 samples, 3 of them in-batch, 10 negatives
    b, geo = make_batch(rng, packs=2, texts=12, samples=3, negs=3)
    s = {k: np.asarray(v) for k, v in globalize_slots(b, geo).items()}
    E, X, d = 2, geo.packs * geo.texts_per_pack, 8  # MRL dims 8, 4
    x0 = rng.normal(size=(E, X, d))
    teacher = rng.normal(size=(E, X, 12)) if with_teacher else None
    kd_weight = 0.7 if with_teacher else 0.0
    assert 0 < (s["sample_valid"] & s["in_batch"]).sum() < s["sample_valid"].sum()
    f = functools.partial(L.nested_contrastive_loss, slots=s, temperature=0.05, mrl_min_dim=4,
                          kd_weight=kd_weight, in_batch_gradient=in_batch_gradient,
                          teacher_pooled=None if teacher is None else teacher.astype(np.float32))
    (total, m), grad = jax.jit(jax.value_and_grad(lambda x: f(x), has_aux=True))(
        x0.astype(np.float32))
    frozen = x0 if in_batch_gradient == "queries" else None
    want = numpy_loss(x0, s, 0.05, 4, teacher, kd_weight, frozen)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(  # the loop reference agrees on the value
        want, reference_loss(x0, s, 0.05, 4, teacher, kd_weight)[0], rtol=1e-9)
    oracle = np.zeros_like(x0)
    eps = 1e-6
    for idx in np.ndindex(*x0.shape):
        hi, lo = x0.copy(), x0.copy()
        hi[idx] += eps
        lo[idx] -= eps
        oracle[idx] = (numpy_loss(hi, s, 0.05, 4, teacher, kd_weight, frozen)
                       - numpy_loss(lo, s, 0.05, 4, teacher, kd_weight, frozen)) / (2 * eps)
    np.testing.assert_allclose(grad, oracle, rtol=2e-4, atol=2e-5)
    # The two options differ exactly in the gradient reaching in-batch positives.
    pos_texts = s["positive_text"][s["sample_valid"] & s["in_batch"]]
    if in_batch_gradient == "queries":
        full = jax.jit(jax.grad(lambda x: L.nested_contrastive_loss(
            x, s, temperature=0.05, mrl_min_dim=4, kd_weight=kd_weight, in_batch_gradient="full",
            teacher_pooled=None if teacher is None else teacher.astype(np.float32))[0]))(
                x0.astype(np.float32))
        others = np.setdiff1d(np.arange(X), s["positive_text"][s["sample_valid"]])
        np.testing.assert_allclose(grad[:, others], full[:, others], rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(grad)[:, pos_texts] - np.asarray(full)[:, pos_texts]).max() \
            > 1e-3


def torch_reference_grad(x, s, tau, min_dim):
    """d(total)/d(pooled) by torch autograd, the reference's way: the in-batch columns are the
    positives as accelerate's gather returns them under DeepSpeed (no autograd graph, at any
    process count, one included: `.detach()` here). One rank holding the whole batch."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    E, X, d = x.shape
    valid = np.flatnonzero(s["sample_valid"])
    rows = [i for i, v in enumerate(valid) if s["in_batch"][v]]
    total = 0.0
    for e in range(E):
        for n, m in enumerate(mrl_dims(d, min_dim), start=1):
            w = 1.0 / (n * math.sqrt(d / m))
            q = F.normalize(xt[e, s["query_text"][valid], :m], dim=-1)
            p = F.normalize(xt[e, s["positive_text"][valid], :m], dim=-1)
            hard = []
            for i, v in enumerate(valid):
                negs = s["negative_text"][v][s["negative_valid"][v]]
                cand = torch.cat([p[i:i + 1], F.normalize(xt[e, negs, :m], dim=-1)])
                hard.append(F.cross_entropy((cand @ q[i] / tau)[None], torch.tensor([0])))
            gathered = p.detach()
            inb = F.cross_entropy(q[rows] @ gathered.T / tau, torch.tensor(rows))
            total = total + w * (torch.stack(hard).mean() + inb)
    (total / E).backward()
    return xt.grad.numpy()


def test_default_in_batch_gradient_is_the_references():
    """The default config's loss has the reference's gradient (torch autograd, gathered
    positives detached); `full` differs from it at the positives only."""
    rng = np.random.default_rng(3)
    b, geo = make_batch(rng, packs=2, texts=12, samples=3, negs=3)
    s = {k: np.asarray(v) for k, v in globalize_slots(b, geo).items()}
    assert 0 < (s["sample_valid"] & s["in_batch"]).sum() < s["sample_valid"].sum()
    x = rng.normal(size=(2, geo.packs * geo.texts_per_pack, 16))  # MRL dims 16, 8
    kw = L.config_kwargs(base_config().loss)

    def grad(**over):
        f = lambda v: L.nested_contrastive_loss(v, s, **{**kw, **over})[0]
        return np.asarray(jax.jit(jax.grad(f))(x.astype(np.float32)))

    want = torch_reference_grad(x, s, kw["temperature"], kw["mrl_min_dim"])
    got = grad()
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=2e-5 * scale)
    full = grad(in_batch_gradient="full")
    pos = s["positive_text"][s["sample_valid"]]
    others = np.setdiff1d(np.arange(x.shape[1]), pos)
    np.testing.assert_allclose(full[:, others], want[:, others], atol=2e-5 * scale)
    assert np.abs(full[:, pos] - want[:, pos]).max() > 0.05 * scale
