"""Packing: first-fit-decreasing correctness and the packed row layout."""

from __future__ import annotations

import numpy as np
import pytest

from mlembed_jax.batch import BatchGeometry, check_batch
from mlembed_jax.data import packing


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
    rows, offs = packing.plan_pack(lens, g, "ffd")
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


def test_samples_that_do_not_fit_are_an_error():
    g = BatchGeometry(1, 2, 16, 8, 2, 2)
    with pytest.raises(packing.PackingError, match="do not fit a pack of 2 rows x 16"):
        packing.plan_pack(np.array([[16, 16, 16, 1]]), g, "ffd")
    with pytest.raises(packing.PackingError, match="exceeds seq_len=16"):
        packing.plan_pack(np.array([[17, 1, 1, 1]]), g, "ffd")
    with pytest.raises(packing.PackingError, match="exceeds seq_len=16"):
        packing.ffd_rows_needed(np.array([[17, 1]]), 16)
