"""Cached embedding gradients (grad_cache.py): the same gradients and losses as the plain step,
with MEL, MLL, MRL and KD on, on one device and under a data x fsdp mesh."""

import dataclasses

import jax
import numpy as np
import pytest
from train_helpers import run_cli, small_config, train_losses

from mlembed_jax import grad_cache
from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.model.encoder import init_params
from mlembed_jax.sharding import make_mesh, to_global_batch
from mlembed_jax.train_step import build_step, loss_and_grads

PACKS = 32  # 8 chunks of 1 pack per device under a 4-shard mesh


@pytest.fixture(scope="module")
def batch_and_config():
    config = small_config(**{"data.packs_per_step": PACKS})
    it = make_train_iterator(config, PACKS, prefetch=0)
    # A batch with in-batch (retrieval) samples, so every loss term is live.
    batch = next(b for b, _ in (next(it) for _ in range(20))
                 if (b["in_batch"] & b["sample_valid"]).any())
    return config, it.global_geometry, batch


def _grads(config, geometry, batch, chunks, mesh_cfg):
    """(loss, metrics, grads) of the real step's loss, jitted with the run's shardings."""
    with config.unlocked():
        config.mesh.update(mesh_cfg)
        config.train.grad_cache_chunks = chunks
    mesh = make_mesh(config.mesh)
    step = build_step(config, mesh, total_steps=10, geometries=geometry)
    setup = step.setup
    teacher_cfg = dataclasses.replace(setup.enc, mel=False)  # same exits: paired by index
    # A random teacher stands in for an HF one (which loss.teacher would name), with KD on.
    setup = dataclasses.replace(setup, teacher=teacher_cfg,
                                loss_kwargs={**setup.loss_kwargs, "kd_weight": 1.0})
    params = init_params(setup.enc, jax.random.key(0))
    teacher = init_params(teacher_cfg, jax.random.key(1))
    params = jax.device_put(params, step.state_shardings.params)
    with step.rules_context():
        gb = to_global_batch(batch, geometry, mesh, step.rules)
        fn = jax.jit(lambda p, b, t: loss_and_grads(setup, p, b, t, rank=16))
        (loss, metrics), grads = fn(params, gb, teacher)
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


def _assert_close(got, want, rtol=1e-5):
    """Every leaf within rtol of the largest |entry| of the same leaf of `want`."""
    flat_g = jax.tree_util.tree_leaves(got)
    flat_w = jax.tree_util.tree_leaves(want)
    assert len(flat_g) == len(flat_w)
    for (path, _), g, w in zip(jax.tree_util.tree_leaves_with_path(got), flat_g, flat_w):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(np.abs(w).max(), 1e-12)
        assert np.abs(g - w).max() <= rtol * scale, (jax.tree_util.keystr(path),
                                                     np.abs(g - w).max() / scale)


@pytest.mark.integration
@pytest.mark.parametrize("mesh_cfg", [  # slow: the 2 x 2 mesh is the harder case
    pytest.param({"num_devices": 1, "data": -1, "fsdp": 1, "tensor": 1},
                 marks=pytest.mark.slow),
    {"num_devices": 4, "data": 2, "fsdp": 2, "tensor": 1},
], ids=["1device", "data2_fsdp2"])
def test_cached_gradients_equal_the_plain_step(batch_and_config, mesh_cfg):
    config, geometry, batch = batch_and_config
    config = config.copy_and_resolve_references()
    loss, metrics, want = _grads(config, geometry, batch, 0, mesh_cfg)
    assert metrics["kd"] > 0 and metrics["in_batch"] > 0 and metrics["hard"] > 0
    for chunks in (1, 2, 8):
        c_loss, c_metrics, got = _grads(config, geometry, batch, chunks, mesh_cfg)
        assert abs(c_loss - loss) <= 1e-5 * abs(loss), (chunks, c_loss, loss)
        for key in ("hard", "in_batch", "kd"):
            np.testing.assert_allclose(c_metrics[key], metrics[key], rtol=1e-5)
        _assert_close(got, want)


def test_chunks_keep_every_device_on_its_own_packs():
    """chunk_batch then unchunk_texts is the identity on the step's pack order, and chunk c
    holds packs c*k.. of every device's run (k packs per device per chunk)."""
    shards, chunks, P, T = 2, 2, 8, 3
    packs = np.arange(P)
    chunked = np.asarray(grad_cache.chunk_batch({"dataset_id": packs}, shards, chunks)
                         ["dataset_id"])
    # Device 0 holds packs 0..3, device 1 packs 4..7; k = 2.
    np.testing.assert_array_equal(chunked, [[0, 1, 4, 5], [2, 3, 6, 7]])
    texts = np.arange(2 * P * T * 1, dtype=np.float32).reshape(2, P * T, 1)  # [E, P*T, d]
    back = grad_cache.unchunk_texts(grad_cache.chunk_texts(texts, shards, chunks), shards,
                                    chunks)
    np.testing.assert_array_equal(np.asarray(back), texts)


@pytest.mark.integration
@pytest.mark.slow  # the step's gradients are checked exactly above
def test_short_run_losses_match_the_plain_run(tmp_path):
    """A demo-sized run with 2 chunks logs the same loss at every step as the plain run."""
    common = {"train.max_steps": 6, "data.packs_per_step": 4, "mesh.num_devices": 1}
    plain = run_cli(tmp_path / "plain", **common)
    assert plain.returncode == 0, plain.stderr[-2000:]
    cached = run_cli(tmp_path / "cached", **common, **{"train.grad_cache_chunks": 2})
    assert cached.returncode == 0, cached.stderr[-2000:]
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "cached")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_chunks_must_divide_the_packs(batch_and_config):
    from mlembed_jax.config import ConfigError

    config, geometry, _ = batch_and_config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.grad_cache_chunks = 3
        config.mesh.num_devices = 1
    with pytest.raises(ConfigError, match="data.packs_per_step to a multiple of 3"):
        build_step(config, make_mesh(config.mesh), total_steps=10, geometries=geometry)


def test_auto_chunks_are_one_pack_per_device():
    """train.grad_cache_chunks=-1: as many chunks as packs per batch shard, off at one."""
    assert [grad_cache.resolve_chunks(-1, 8, d) for d in (1, 2, 4, 8)] == [8, 4, 2, 0]
    assert grad_cache.resolve_chunks(0, 8, 1) == 0 and grad_cache.resolve_chunks(2, 8, 1) == 2
