"""Every attention kernel against the dense masked reference, on packed rows: same outputs
and gradients, and no text attends to another text of its row."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlembed_jax.model import attention
from mlembed_jax.model.kernel_choice import GPU_ONLY

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"


def _packed_inputs(seq, rows=2, h=4, kv=2, d=32, seed=0):
    """Rows holding several texts of uneven length, then padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        c, s = 0, 1
        while True:
            n = int(rng.integers(seq // 8, seq // 3))
            if c + n > seq - seq // 10:
                break
            seg[r, c:c + n] = s
            c, s = c + n, s + 1
    q = rng.normal(size=(rows, seq, h, d)).astype(np.float32)
    k = rng.normal(size=(rows, seq, kv, d)).astype(np.float32)
    v = rng.normal(size=(rows, seq, kv, d)).astype(np.float32)
    return q, k, v, seg


def _kernels():
    out = [("xla_sdpa", attention.ATTENTION_IMPLS["xla_sdpa"], 1e-5)]
    # Blocks of 40 over rows of 96: three query blocks, the last one short, so both the
    # skipped upper half and an uneven split are checked.
    out.append(("dense_blocks", functools.partial(attention.dense_blocks_attention, block=40),
                1e-5))
    # Pallas' interpreter runs the real splash kernel code on CPU (slowly), so its masking
    # and segment handling are checked here, not only on a TPU.
    out.append(("splash", functools.partial(attention.splash_attention, block=128,
                                            interpret=not ON_TPU), 2e-5))
    # tokamax's XLA path runs everywhere: it checks our mask and layout wiring on CPU; the
    # GPU kernels behind the same call are checked where a GPU is present.
    out.append(("tokamax_xla", attention.ATTENTION_IMPLS["tokamax_xla"], 2e-5))
    if ON_GPU:
        for name in ("cudnn", "tokamax_mosaic", "tokamax_triton"):
            out.append((name, attention.ATTENTION_IMPLS[name], 2e-2))
    return out


def _inputs_for(name, seed=0):
    """Shapes each kernel accepts: Pallas kernels want whole blocks; the GPU kernels get the
    model's head_dim (128), since their tilings are tuned for it."""
    if name in GPU_ONLY:
        return _packed_inputs(256, d=128, seed=seed)
    return _packed_inputs(128 if name == "splash" else 96, seed=seed)


@pytest.mark.parametrize("name,fn,tol", _kernels(), ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_matches_dense_reference(name, fn, tol):
    q, k, v, seg = _inputs_for(name)
    dtype = jnp.bfloat16 if name in GPU_ONLY else jnp.float32
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    want = attention.dense_masked_attention(q, k, v, seg)
    got = fn(q, k, v, seg)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got, np.float32)[real],
                               np.asarray(want, np.float32)[real], atol=tol, rtol=tol)
    # Gradients (what training uses) agree too.
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real[..., None, None], f(q, k, v, seg), 0))
    g_want = jax.grad(loss(attention.dense_masked_attention), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("name,fn,tol", _kernels(), ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_never_crosses_texts(name, fn, tol):
    q, k, v, seg = _inputs_for(name, seed=1)
    dtype = jnp.bfloat16 if name in GPU_ONLY else jnp.float32
    run = lambda q, k, v: np.asarray(fn(*(jnp.asarray(x, dtype) for x in (q, k, v)), seg),
                                     np.float32)
    base = run(q, k, v)
    # Scramble the keys and values of text 2 of row 0; every other text must be unchanged.
    hit = seg[0] == 2
    k2, v2 = k.copy(), v.copy()
    k2[0, hit] = 50.0
    v2[0, hit] = -50.0
    moved = run(q, k2, v2)
    others = (seg > 0) & ~((np.arange(seg.shape[0])[:, None] == 0) & (seg == 2))
    np.testing.assert_allclose(moved[others], base[others], atol=tol, rtol=tol)
    assert np.abs(moved[0, hit] - base[0, hit]).max() > 1.0


@pytest.mark.parametrize("name", ["splash", "tokamax_xla"])
def test_local_kernels_under_a_mesh_run_per_shard(name):
    """Under a mesh the kernel runs inside shard_map over the batch axes."""
    from mlembed_jax.config import base_config
    from mlembed_jax.sharding import activation_rules, batch_sharding, make_mesh

    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = make_mesh(c.mesh)
    q, k, v, seg = _packed_inputs(128, rows=4, seed=2)
    want = np.asarray(attention.dense_masked_attention(q, k, v, seg))
    fn = jax.jit(functools.partial(attention.splash_attention, block=128, interpret=True)
                 if name == "splash" else attention.ATTENTION_IMPLS[name])
    with activation_rules(mesh, c.mesh.logical_axis_rules):
        rules = c.mesh.logical_axis_rules
        args = [jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for x in (q, k, v, seg)]
        got = fn(*args)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(ON_GPU, reason="checks the error a non-GPU run gets")
@pytest.mark.parametrize("name", sorted(GPU_ONLY))
def test_gpu_kernels_refuse_other_platforms_with_a_clear_error(name):
    from mlembed_jax.attention_choice import resolve_attention
    from mlembed_jax.config import ConfigError, base_config

    c = base_config()
    c.model.attention = name
    with pytest.raises(ConfigError, match=f"{name}.*NVIDIA GPUs only.*'dense'"):
        resolve_attention(c, jax.devices())
    c.model.attention = "tokamax_xla"
    resolve_attention(c, jax.devices())  # portable: no error
