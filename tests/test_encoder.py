"""Encoder behaviour on packed rows, MEL ranks, compilation count and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlembed_jax.config import base_config
from mlembed_jax.model.attention import dense_masked_attention
from mlembed_jax.model.encoder import encode, init_params, param_logical_axes
from mlembed_jax.model.factorized_embed import sample_mel_rank, svd_factors
from mlembed_jax.model.qwen3 import EncoderConfig, padded_inputs
from mlembed_jax.recipe import mel_rank_set
from mlembed_jax.sharding import activation_rules, batch_sharding, logical_shardings, make_mesh

CFG = EncoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, mel=True, mel_r_max=32,
                    mel_r_min=8, exits=(1, 2, 4))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _texts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, n).astype(np.int32) for n in lengths]


def _pack(texts, rows, seq):
    """Packs texts greedily in order into `rows` rows (test-side packer, independent of ours)."""
    tok = np.zeros((rows, seq), np.int32)
    seg = np.zeros_like(tok)
    pos = np.zeros_like(tok)
    pool = []
    r, c, s = 0, 0, 0
    for t in texts:
        if c + len(t) > seq:
            r, c, s = r + 1, 0, 0
        s += 1
        tok[r, c:c + len(t)] = t
        seg[r, c:c + len(t)] = s
        pos[r, c:c + len(t)] = np.arange(len(t))
        pool.append(r * seq + c + len(t) - 1)
        c += len(t)
    return tok, seg, pos, np.asarray(pool, np.int32)[None]


def _alone(params, text, rank=None):
    tok = jnp.asarray(text)[None]
    seg, pos, pool = padded_inputs(tok, [len(text)])
    return np.asarray(encode(params, CFG, tok, seg, pos, pool, rank=rank)["pooled"][:, 0])


def test_alone_padded_and_packed_agree(params):
    texts = _texts([5, 11, 3, 8, 13])
    alone = np.stack([_alone(params, t) for t in texts], axis=1)  # [exits, texts, d]
    seq = 16
    padded = np.zeros((len(texts), seq), np.int32)
    for i, t in enumerate(texts):
        padded[i, :len(t)] = t
    seg, pos, pool = padded_inputs(padded, [len(t) for t in texts])
    out_pad = encode(params, CFG, padded, seg, pos, pool)["pooled"]
    np.testing.assert_allclose(np.asarray(out_pad), alone, atol=1e-5)
    tok, seg, pos, pool = _pack(texts, rows=3, seq=seq)
    assert (seg.max(axis=1) >= 2).any(), "the test must put several texts in one row"
    out_packed = encode(params, CFG, tok, seg, pos, pool)["pooled"]
    np.testing.assert_allclose(np.asarray(out_packed), alone, atol=1e-5)


def test_packed_text_never_sees_another(params):
    texts = _texts([6, 7, 5])
    tok, seg, pos, pool = _pack(texts, rows=1, seq=20)
    base = np.asarray(encode(params, CFG, tok, seg, pos, pool, return_hidden=True)["hidden"])
    # Change every token of text 2 (middle): texts 1 and 3 must not move at all.
    tok2 = tok.copy()
    tok2[seg == 2] = (tok2[seg == 2] % (CFG.vocab_size - 1)) + 1
    moved = np.asarray(encode(params, CFG, tok2, seg, pos, pool, return_hidden=True)["hidden"])
    for s in (1, 3):
        np.testing.assert_array_equal(moved[:, seg == s], base[:, seg == s])
    assert np.abs(moved[:, seg == 2] - base[:, seg == 2]).max() > 1e-3


def test_dense_masked_equals_plain_causal_for_one_text_per_row():
    rng = np.random.default_rng(1)
    b, s, h, kv, d = 2, 9, 4, 2, 8
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kv, d)).astype(np.float32)
    out = np.asarray(dense_masked_attention(q, k, v, np.ones((b, s), np.int32)))
    # Plain causal softmax attention in NumPy, kv heads repeated for GQA.
    kr, vr = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, kr) / np.sqrt(d)
    logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", p, vr)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_rank_r_equals_explicit_truncated_factors(params):
    text = _texts([9])[0]
    u, v = params["embed_tokens"]["U"], params["embed_tokens"]["V"]
    for r in (8, 16, 32):
        got = _alone(params, text, rank=r)
        explicit = {**params, "embed_tokens": {"U": jnp.pad(u[:, :r], ((0, 0), (0, 32 - r))),
                                               "V": v}}
        np.testing.assert_allclose(got, _alone(explicit, text), atol=1e-5)
        # And directly: the embedding rows U[t, :r] @ V[:r] of the MEL lookup.
        from mlembed_jax.model.factorized_embed import FactorizedEmbed

        emb = FactorizedEmbed(CFG.vocab_size, CFG.hidden_size, 32).apply(
            {"params": params["embed_tokens"]}, jnp.asarray(text), r)
        np.testing.assert_allclose(np.asarray(emb), np.asarray(u[text, :r] @ v[:r]), atol=1e-5)


def test_changing_rank_does_not_recompile(params):
    traces = []

    @jax.jit
    def f(p, tok, seg, pos, pool, rank):
        traces.append(1)  # runs once per trace, i.e. per compilation
        return encode(p, CFG, tok, seg, pos, pool, rank=rank)["pooled"]

    tok = jnp.asarray(np.stack(_texts([8, 8])))
    seg, pos, pool = padded_inputs(tok, [8, 8])
    outs = [f(params, tok, seg, pos, pool, jnp.int32(r)) for r in (8, 16, 32, 8)]
    assert len(traces) == 1
    assert f._cache_size() == 1
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))


def test_rank_sampling_is_proportional_to_rank():
    assert mel_rank_set(64, 512) == (64, 128, 256, 512)
    keys = jax.random.split(jax.random.key(3), 20000)
    ranks = np.asarray(jax.vmap(lambda k: sample_mel_rank(k, 64, 512))(keys))
    freq = {r: np.mean(ranks == r) for r in (64, 128, 256, 512)}
    # P(r) = r / (64 + 128 + 256 + 512) = r / 960; 20000 draws give std < 0.0035.
    for r, f in freq.items():
        assert abs(f - r / 960) < 0.015, (r, f)


def test_svd_factors_best_low_rank():
    w = np.random.default_rng(0).normal(size=(200, 32))
    u, v = svd_factors(w, 32)
    np.testing.assert_allclose(u @ v, w, atol=1e-4)
    s = np.linalg.svd(w, compute_uv=False)
    for r in (4, 16):
        # Eckart-Young: the rank-r error's Frobenius norm is sqrt(sum of the dropped s^2).
        err = np.linalg.norm(u[:, :r] @ v[:r] - w)
        np.testing.assert_allclose(err, np.sqrt((s[r:] ** 2).sum()), rtol=1e-4)


@pytest.mark.parametrize("attention", ["dense", "xla_sdpa", "tokamax_xla"])
def test_sharded_on_8_devices_equals_one_device(params, attention):
    """Each portable kernel, sharded over data x fsdp x tensor, equals dense on one device."""
    import dataclasses

    assert jax.device_count() == 8
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = make_mesh(c.mesh)
    rules = c.mesh.logical_axis_rules
    shardings = logical_shardings(param_logical_axes(CFG), mesh, rules)
    sharded = jax.device_put(params, shardings)
    q_spec = sharded["layers"]["self_attn"]["q_proj"].sharding.spec
    assert "fsdp" in q_spec and "tensor" in q_spec, q_spec
    texts = _texts([5, 7, 3, 8, 6, 2, 9, 4])
    tok = np.zeros((8, 10), np.int32)
    for i, t in enumerate(texts):
        tok[i, :len(t)] = t
    seg, pos, pool = padded_inputs(tok, [len(t) for t in texts])
    fn = lambda cfg: jax.jit(lambda p, *a: encode(p, cfg, *a, rank=jnp.int32(16))["pooled"])
    want = np.asarray(fn(CFG)(params, tok, seg, pos, pool))
    with activation_rules(mesh, rules):
        args = [jax.device_put(x, batch_sharding(mesh, rules, x.ndim))
                for x in (tok, seg, pos, pool)]
        got = fn(dataclasses.replace(CFG, attention=attention))(sharded, *args)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_bf16_params_and_compute_run_close_to_fp32(params):
    import dataclasses

    bf = dataclasses.replace(CFG, param_dtype="bfloat16", compute_dtype="bfloat16", remat="dots")
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    text = _texts([12])[0]
    tok = jnp.asarray(text)[None]
    seg, pos, pool = padded_inputs(tok, [12])
    a = np.asarray(encode(p16, bf, tok, seg, pos, pool)["pooled"])
    b = _alone(params, text)[:, None]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99, cos


def _grad_fn(cfg, params):
    texts = _texts([5, 11, 3, 8, 13, 7])
    tok, seg, pos, pool = _pack(texts, rows=4, seq=16)
    # A random projection: sum(pooled ** 2) of RMS-normed outputs is nearly constant, and
    # its tiny gradient would be all rounding noise.
    w = jax.random.normal(jax.random.key(1), (len(cfg.exits), len(texts), cfg.hidden_size))
    loss = lambda p: jnp.sum(encode(p, cfg, tok, seg, pos, pool)["pooled"] * w)
    return jax.grad(loss), params


@pytest.mark.parametrize("attention", [
    "dense", pytest.param("tokamax_xla", marks=pytest.mark.slow)])  # slow: dense shows it
def test_remat_policies_give_the_same_gradients(params, attention):
    import dataclasses

    base = dataclasses.replace(CFG, attention=attention)
    grad, p = _grad_fn(dataclasses.replace(base, remat="none"), params)
    want = jax.jit(grad)(p)
    for policy in ("full", "dots", "attn_out", "attention", "dots_attention"):
        grad, _ = _grad_fn(dataclasses.replace(base, remat=policy), params)
        got = jax.jit(grad)(p)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            a, b = np.asarray(a), np.asarray(b)  # recomputation reorders fp32 sums only
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), policy


def test_unrolled_layer_loop_gives_the_same_outputs_and_gradients(params):
    import dataclasses

    grad, p = _grad_fn(CFG, params)
    want = jax.jit(grad)(p)
    for unroll in (2, 3, 4):  # 3: a loop of one iteration plus a straight-line remainder
        grad, _ = _grad_fn(dataclasses.replace(CFG, scan_unroll=unroll), params)
        got = jax.jit(grad)(p)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), unroll


def test_remat_attention_keeps_the_kernel_residuals(params):
    """remat='attention' must not rerun the attention forward in the backward pass;
    'attn_out' does (custom-VJP residuals are recomputed), and 'dots_attention' recomputes
    neither attention nor any matmul. Counted in the gradient's jaxpr, where the scanned
    layer body appears once whatever the layer count: softmax exps (the dense kernel has one
    per forward) and dot_generals."""
    import dataclasses

    def count(policy):
        grad, p = _grad_fn(dataclasses.replace(CFG, remat=policy), params)
        text = str(jax.make_jaxpr(grad)(p))
        return text.count(" exp "), text.count("dot_general")

    none, full = count("none"), count("full")
    assert count("attention")[0] == none[0]
    assert count("attn_out")[0] == count("dots")[0] == none[0] + 1
    assert count("dots_attention") == none  # only elementwise work is recomputed
    assert full[1] > none[1]  # the test can tell recomputed matmuls apart


def test_remat_attention_with_a_per_shard_kernel_under_a_mesh(params):
    """Named residuals of a shard_map kernel (tokamax_xla), sharded data x fsdp x tensor,
    give the gradients of dense attention with no remat on one device."""
    import dataclasses

    texts = _texts([5, 11, 3, 8, 13, 7, 9, 4, 6, 2, 10, 12])
    tok, seg, pos, pool = _pack(texts, rows=8, seq=16)
    w = jax.random.normal(jax.random.key(1), (len(CFG.exits), len(texts), CFG.hidden_size))
    grad = lambda cfg: jax.jit(jax.grad(
        lambda p, *a: jnp.sum(encode(p, cfg, *a)["pooled"] * w)))
    want = grad(CFG)(params, tok, seg, pos, pool)
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh, rules = make_mesh(c.mesh), c.mesh.logical_axis_rules
    sharded = jax.device_put(params, logical_shardings(param_logical_axes(CFG), mesh, rules))
    cfg = dataclasses.replace(CFG, attention="tokamax_xla", remat="attention")
    with activation_rules(mesh, rules):
        rows = [jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for x in (tok, seg, pos)]
        got = grad(cfg)(sharded, *rows, pool)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def _eqns(jaxpr, top=True):
    """(equation, at the top level) for every equation of a jaxpr and the jaxprs nested in
    it (the layer scan's body, remat and custom-VJP calls)."""
    for eqn in jaxpr.eqns:
        yield eqn, top
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub, top=False)


def test_tokamax_mask_is_built_once_outside_the_layer_loop(params):
    """The same-text mask [rows, 1, seq, seq] comes from one comparison before the layer
    scan, not one inside its body (which would run once per layer)."""
    import dataclasses

    tok, seg, pos, pool = _pack(_texts([5, 11, 3, 8, 13, 7]), rows=4, seq=16)
    cfg = dataclasses.replace(CFG, attention="tokamax_xla")
    jaxpr = jax.make_jaxpr(lambda p: encode(p, cfg, tok, seg, pos, pool)["pooled"])(params)
    builds = [top for eqn, top in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "eq"
              and eqn.outvars[0].aval.shape == (4, 1, 16, 16)]
    assert builds == [True], builds


@pytest.mark.parametrize("remat", ["none", "attention"])
def test_tokamax_encoder_matches_dense_outputs_and_gradients(params, remat):
    """tokamax_xla (mask prepared once, handed to every layer) against dense attention
    through the whole encoder, at the tolerances of the per-kernel tests."""
    import dataclasses

    tok, seg, pos, pool = _pack(_texts([5, 11, 3, 8, 13, 7]), rows=4, seq=16)
    w = jax.random.normal(jax.random.key(1), (len(CFG.exits), 6, CFG.hidden_size))

    def run(cfg):
        f = lambda p: jnp.sum(encode(p, cfg, tok, seg, pos, pool)["pooled"] * w)
        return jax.jit(jax.value_and_grad(f))(params)

    (got, g_got), (want, g_want) = run(dataclasses.replace(
        CFG, attention="tokamax_xla", remat=remat)), run(CFG)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 2e-5 * np.abs(b).max()
