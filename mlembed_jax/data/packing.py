"""Packing one pack: the texts of up to B samples into R fixed rows of S tokens.

Two modes:
  ffd            first-fit-decreasing: texts sorted longest first, each into the first row
                 with room. Several texts share a row, told apart by segment ids.
  pad_to_longest one text per row (R = T), the reference recipe's layout, for comparison.

Text slots are sample-major: sample i owns slots i*(2+N) .. i*(2+N)+1+N, holding its query,
its positive, then its negatives; unused slots stay empty (text_valid False).

Overflow rule (ffd): a pack takes its candidate samples in order and keeps the longest prefix
whose texts all fit (at most B samples). The samples left over are returned to the caller,
which carries them to the next batch of the same dataset (pipeline.py); nothing is dropped.
"""

from __future__ import annotations

import numpy as np

from mlembed_jax.batch import BatchGeometry


class PackingError(ValueError):
    """A sample that can never fit the configured pack, or a text longer than a row."""


def ffd_place(lengths, rows: int, seq_len: int):
    """First-fit-decreasing. lengths: sequence of ints. Returns (row, offset) lists in input
    order, or None if they don't all fit in `rows` rows of `seq_len`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    loads = [0] * rows
    row_of = [0] * len(lengths)
    off_of = [0] * len(lengths)
    used = 0  # rows 0..used-1 are open; first fit never skips past an unopened row
    for i in order:
        n = lengths[i]
        for r in range(used):
            if loads[r] + n <= seq_len:
                break
        else:
            if used == rows:
                return None
            r = used
            used += 1
        row_of[i] = r
        off_of[i] = loads[r]
        loads[r] += n
    return row_of, off_of


def plan_pack(sample_lengths: np.ndarray, geometry: BatchGeometry, mode: str):
    """Decides how many of the candidate samples fit, and where their texts go.

    sample_lengths: [C, K] int token lengths of C candidate samples' K texts each (query,
      positive, negatives), in candidate order.
    Returns (m, rows, offsets): the first m samples fit; rows/offsets [m*K] per text
      (sample-major), row within the pack and column offset within the row.
    """
    C, K = sample_lengths.shape
    S, R = geometry.seq_len, geometry.rows_per_pack
    if C and int(sample_lengths.max()) > S:
        raise PackingError(f"a text of {int(sample_lengths.max())} tokens exceeds "
                           f"seq_len={S}; prepare_data should have truncated it")
    m = min(C, geometry.samples_per_pack)
    if mode == "pad_to_longest":
        slots = 2 + geometry.max_negatives
        rows = (np.arange(m)[:, None] * slots + np.arange(K)[None]).reshape(-1)
        return m, rows.tolist(), [0] * (m * K)
    # Cheap bound first: the texts of m samples can't fit if they exceed the raw capacity.
    totals = np.cumsum(sample_lengths[:m].sum(axis=1))
    m = int(np.searchsorted(totals, R * S, side="right"))
    flat = sample_lengths[:m].reshape(-1).tolist()
    while m > 0:
        placed = ffd_place(flat[: m * K], R, S)
        if placed is not None:
            return m, placed[0], placed[1]
        m -= 1
    if C:
        raise PackingError(
            f"one sample's {K} texts ({int(sample_lengths[0].sum())} tokens, lengths "
            f"{sample_lengths[0].tolist()}) do not fit a pack of {R} rows x {S}; raise "
            "data.rows_per_pack")
    return 0, [], []


def fill_pack(batch: dict, p: int, geometry: BatchGeometry, texts: list[np.ndarray], K: int,
              rows, offsets, num_negatives: int, dataset_id: int, in_batch: bool) -> int:
    """Writes m = len(texts) // K samples into pack p of `batch` (a zeroed local batch).

    texts: the m*K token arrays, sample-major (query, positive, negatives...), EOS last.
    Returns the number of real tokens written.
    """
    S, R = geometry.seq_len, geometry.rows_per_pack
    slots = 2 + geometry.max_negatives
    m = len(texts) // K
    tok, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    pool, valid = batch["pool_index"][p], batch["text_valid"][p]
    next_seg = [1] * R
    # Segment ids must follow column order within a row: visit texts by (row, offset).
    order = sorted(range(len(texts)), key=lambda t: (rows[t], offsets[t]))
    real = 0
    for t in order:
        ids = texts[t]
        n = len(ids)
        r, o = rows[t], offsets[t]
        gr = p * R + r
        tok[gr, o:o + n] = ids
        seg[gr, o:o + n] = next_seg[r]
        pos[gr, o:o + n] = _ARANGE[:n] if n <= len(_ARANGE) else np.arange(n)
        next_seg[r] += 1
        i, j = divmod(t, K)
        slot = i * slots + j
        pool[slot] = r * S + o + n - 1
        valid[slot] = True
        real += n
    base = np.arange(m) * slots
    batch["query_text"][p, :m] = base
    batch["positive_text"][p, :m] = base + 1
    batch["negative_text"][p, :m, :num_negatives] = base[:, None] + 2 + np.arange(num_negatives)
    batch["negative_valid"][p, :m, :num_negatives] = True
    batch["sample_valid"][p, :m] = True
    batch["in_batch"][p, :m] = in_batch
    batch["dataset_id"][p, :m] = dataset_id
    return real


_ARANGE = np.arange(8192, dtype=np.int32)


def padding_stats(real_tokens: int, cells: int, text_lengths: list[int]) -> dict:
    """Padding of a (local) batch of `cells` token positions, plus the padding the reference
    layout would have on the same texts (each text padded to the longest of the batch)."""
    out = {"real_tokens": int(real_tokens), "texts": len(text_lengths),
           "padding_fraction": 1.0 - real_tokens / cells if cells else 0.0}
    if text_lengths:
        out["padding_fraction_longest"] = 1.0 - real_tokens / (len(text_lengths)
                                                               * max(text_lengths))
    else:
        out["padding_fraction_longest"] = 0.0
    return out
