"""embedding.embed_token_ids on many devices: packs split across the batch axes of a mesh give
the embeddings one device gives; and the inference packing that feeds it. (Params sharded
over a training mesh: tests/test_retrieval_eval.py's periodic evaluator test.)"""

from __future__ import annotations

import jax
import numpy as np

from mlembed_jax.data.packing import plan_batches
from mlembed_jax.embedding import embed_token_ids, group_plans, local_mesh
from mlembed_jax.model.encoder import init_params
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.perf import benchmark_mix

CFG = EncoderConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8, mel=True, mel_r_max=16,
                    mel_r_min=4)


def _ids(n: int, seed: int = 0) -> list[np.ndarray]:
    """n texts of 1..40 tokens (EOS = 1 last): row lengths 16 to 64."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(2, CFG.vocab_size, int(k) - 1), 1).astype(np.int32)
            for k in rng.integers(1, 41, size=n)]


def _params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def test_eight_devices_embed_like_one():
    assert len(jax.local_devices()) == 8  # tests/conftest.py
    params = jax.device_get(_params())
    ids = _ids(200)
    kw = dict(rank=8, batch_tokens=128)
    one = embed_token_ids(params, CFG, ids, (1, 3), mesh=local_mesh(jax.local_devices()[:1]),
                          **kw)
    eight = embed_token_ids(params, CFG, ids, (1, 3), **kw)  # default: every local device
    assert eight.shape == (2, 200, 32)
    np.testing.assert_allclose(eight, one, atol=1e-5)
    # Fewer texts than devices: the missing packs are empty and their outputs dropped.
    np.testing.assert_allclose(embed_token_ids(params, CFG, ids[:3], (3,), **kw)[0],
                               one[1, :3], atol=1e-5)
    # The texts really went 8 packs per forward: one per device.
    plans = plan_batches([len(t) for t in ids], 128)
    groups = group_plans(plans, 8)
    assert len(groups) < len(plans) / 4
    assert all(len(g) <= 8 and len({p.seq_len for p in g}) == 1 for g in groups)
    assert sorted(np.concatenate([p.index for g in groups for p in g])) == list(range(200))


def test_inference_rows_are_nearly_full_on_the_benchmark_mix():
    """plan_batches on 18,000 texts of the benchmark length mix: every text once, no two in
    the same cells, and 0.13% padding (measured; longest-first filling alone padded 28%)."""
    lengths = benchmark_mix.sample_lengths(np.random.default_rng(0), 2000).reshape(-1)
    plans = plan_batches(lengths, 16384)
    assert sorted(np.concatenate([p.index for p in plans])) == list(range(len(lengths)))
    cells = 0
    for p in plans:
        used = np.zeros(p.num_rows * p.seq_len + 1, np.int64)  # one past the end: overflow
        starts = p.rows * p.seq_len + p.offsets
        assert np.all(p.offsets + lengths[p.index] <= p.seq_len)
        np.add.at(used, starts, 1)
        np.add.at(used, starts + lengths[p.index], -1)
        assert np.cumsum(used).max() == 1  # intervals never overlap
        cells += p.num_rows * p.seq_len
    assert 1 - lengths.sum() / cells < 0.005
    # A few compiled shapes: power-of-two row lengths, and per row length a full batch shape
    # plus at most a smaller last one.
    shapes = {(p.seq_len, p.num_rows) for p in plans}
    assert len(shapes) <= 2 * len({p.seq_len for p in plans})
