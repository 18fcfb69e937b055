"""Packing: first-fit-decreasing correctness and the benchmark length mix."""

from __future__ import annotations

import numpy as np
import pytest

from mlembed_jax.batch import BatchGeometry, check_batch, geometry_from_config
from mlembed_jax.config import base_config
from mlembed_jax.data import packing
from mlembed_jax.perf import benchmark_mix


def test_ffd_places_every_text_without_overlap():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 65, size=rng.integers(1, 40)).tolist()
        placed = packing.ffd_place(lengths, rows=12, seq_len=64)
        if placed is None:
            assert sum(lengths) > 12 * 64 * 0.5  # only fails when really full
            continue
        rows, offs = placed
        used = np.zeros((12, 64), int)
        for n, r, o in zip(lengths, rows, offs):
            assert o + n <= 64
            used[r, o:o + n] += 1
        assert used.max() == 1 and used.sum() == sum(lengths)
    assert packing.ffd_place([64, 64, 1], rows=2, seq_len=64) is None


def test_fill_pack_rows_decode_to_inputs_in_order():
    g = BatchGeometry(packs=2, rows_per_pack=3, seq_len=16, texts_per_pack=3 * 4,
                      samples_per_pack=3, max_negatives=2)
    rng = np.random.default_rng(1)
    lens = np.array([[3, 9, 4, 2], [5, 7, 6, 1]])
    m, rows, offs = packing.plan_pack(lens, g, "ffd")
    assert m == 2
    texts = [np.append(rng.integers(2, 100, n - 1), 1).astype(np.int32) for n in lens.ravel()]
    batch = g.empty()
    real = packing.fill_pack(batch, 1, g, texts, 4, rows, offs, 2, dataset_id=3, in_batch=True)
    check_batch(batch, g)
    assert real == lens.sum() and not batch["text_valid"][0].any()
    for t, ids in enumerate(texts):
        i, j = divmod(t, 4)
        slot = i * 4 + j
        r, end = divmod(int(batch["pool_index"][1, slot]), 16)
        row = 3 + r
        seg = batch["segment_ids"][row] == batch["segment_ids"][row, end]
        np.testing.assert_array_equal(batch["tokens"][row][seg], ids)
        assert batch["tokens"][row, end] == 1
    assert batch["query_text"][1, :2].tolist() == [0, 4]
    assert batch["negative_text"][1, 1].tolist() == [6, 7]
    assert batch["dataset_id"][1, :2].tolist() == [3, 3]
    assert batch["sample_valid"][1].tolist() == [True, True, False]


def test_one_sample_that_can_never_fit_is_an_error():
    g = BatchGeometry(1, 2, 16, 8, 2, 2)
    with pytest.raises(packing.PackingError, match="raise data.rows_per_pack"):
        packing.plan_pack(np.array([[16, 16, 16, 1]]), g, "ffd")
    with pytest.raises(packing.PackingError, match="exceeds seq_len=16"):
        packing.plan_pack(np.array([[17, 1, 1, 1]]), g, "ffd")


def test_benchmark_mix_padding_at_most_10_percent():
    g = geometry_from_config(base_config().data, packs=2)  # the recipe's pack
    assert (g.rows_per_pack, g.seq_len, g.samples_per_pack) == (19, 1024, 10)
    pads, backlog, samples = [], [], 0
    for batch, stats in benchmark_mix.benchmark_batches(g, steps=150, seed=0):
        pads.append(stats["padding_fraction"])
        backlog.append(stats["carry_backlog"])
        samples += stats["samples"]
    check_batch(batch, g)
    assert np.mean(pads) <= 0.10, np.mean(pads)
    assert max(backlog) <= 2 * 8  # carried-over samples drain: nothing piles up
    assert samples + backlog[-1] == 150 * 2 * 8  # every generated sample packed or waiting
    # The reference layout (each text padded to the longest) pads ~70% on the same mix.
    ref = BatchGeometry(1, 72, 1024, 72, 8, 7)  # one text per row, 7 negatives
    longest = [s["padding_fraction_longest"] for _, s in
               benchmark_mix.benchmark_batches(ref, steps=20, mode="pad_to_longest")]
    assert 0.6 < np.mean(longest) < 0.8
