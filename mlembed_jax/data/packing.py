"""Packing texts into fixed rows of S tokens, for training and for encode.

`first_fit_row` is the placement rule: a text goes into the first open row with room.
Visiting texts longest first makes it first-fit-decreasing (FFD). Training packs with it
(`plan_pack`: the texts of a pack's samples into its R rows; `ffd_rows_needed`: how many rows
FFD opens for many packs at once, which data/plan.py uses to pick each step's shape).
Inference (`plan_batches`: many texts into batches of rows) knows every length up front and
has no samples to keep together, so it also chooses which text goes next: each row takes the
longest text left that still fits, one row at a time (see its docstring; README "Evaluate"
gives the padding of both on the benchmark length mix).

Training has two modes:
  ffd            first-fit-decreasing: texts sorted longest first, each into the first row
                 with room. Several texts share a row, told apart by segment ids.
  pad_to_longest one text per row (R = T), the reference recipe's layout, for comparison.

Text slots are sample-major: sample i owns slots i*(2+N) .. i*(2+N)+1+N, holding its query,
its positive, then its negatives; unused slots stay empty (text_valid False).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mlembed_jax.batch import BatchGeometry


class PackingError(ValueError):
    """A sample that can never fit the configured pack, or a text longer than a row."""


def first_fit_row(loads: list[int], n: int, seq_len: int, max_rows: int) -> int:
    """The first open row of `loads` (tokens used per row) with room for n more tokens;
    opens a new row (appends to `loads`) when none has room. -1 when all max_rows rows are
    open and full. The caller adds n to the returned row's load."""
    for r, load in enumerate(loads):
        if load + n <= seq_len:
            return r
    if len(loads) == max_rows:
        return -1
    loads.append(0)
    return len(loads) - 1


def ffd_place(lengths, rows: int, seq_len: int):
    """First-fit-decreasing. lengths: sequence of ints. Returns (row, offset) lists in input
    order, or None if they don't all fit in `rows` rows of `seq_len`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    loads: list[int] = []
    row_of = [0] * len(lengths)
    off_of = [0] * len(lengths)
    for i in order:
        n = lengths[i]
        r = first_fit_row(loads, n, seq_len, rows)
        if r < 0:
            return None
        row_of[i] = r
        off_of[i] = loads[r]
        loads[r] += n
    return row_of, off_of


def ffd_rows_needed(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows first-fit-decreasing opens for each of n packs: [n, T] int text lengths (0 = no
    text) -> [n] int. Vectorised over packs; the same rule as `ffd_place` (a pack fits R rows
    exactly when this is <= R, since FFD only fails when it would open row R + 1)."""
    lengths = np.asarray(lengths)
    n, T = lengths.shape
    if n == 0 or T == 0:
        return np.zeros(n, np.int64)
    if int(lengths.max()) > seq_len:
        raise PackingError(f"a text of {int(lengths.max())} tokens exceeds seq_len={seq_len}; "
                           "prepare_data should have truncated it")
    desc = -np.sort(-lengths.astype(np.int64), axis=1)
    loads = np.zeros((n, T), np.int64)
    at = np.arange(n)
    opened = 0  # rows opened so far by the fullest pack
    for j in range(T):
        n_j = desc[:, j]
        if not n_j.any():
            break
        # Rows [0, opened] cover every pack's open rows plus its next empty one, and an empty
        # row always fits, so argmax finds the first row with room: first fit.
        fits = loads[:, :opened + 1] + n_j[:, None] <= seq_len
        r = fits.argmax(axis=1)
        loads[at, r] += n_j
        opened = max(opened, int(r.max()) + 1)
    return (loads > 0).sum(axis=1)


def plan_pack(sample_lengths: np.ndarray, geometry: BatchGeometry, mode: str):
    """Where the texts of a pack's samples go.

    sample_lengths: [m, K] int token lengths of the pack's m samples' K texts each (query,
      positive, negatives), m <= B.
    Returns (rows, offsets): [m*K] per text (sample-major), its row within the pack and its
    column offset within the row. Raises PackingError if they do not fit R rows.
    """
    m, K = sample_lengths.shape
    S, R = geometry.seq_len, geometry.rows_per_pack
    if m and int(sample_lengths.max()) > S:
        raise PackingError(f"a text of {int(sample_lengths.max())} tokens exceeds "
                           f"seq_len={S}; prepare_data should have truncated it")
    if m > geometry.samples_per_pack:
        raise PackingError(f"{m} samples for a pack of {geometry.samples_per_pack}")
    if mode == "pad_to_longest":
        slots = 2 + geometry.max_negatives
        rows = (np.arange(m)[:, None] * slots + np.arange(K)[None]).reshape(-1)
        return rows.tolist(), [0] * (m * K)
    placed = ffd_place(sample_lengths.reshape(-1).tolist(), R, S)
    if placed is None:
        raise PackingError(
            f"{m} samples ({int(sample_lengths.sum())} tokens in {m * K} texts) do not fit a "
            f"pack of {R} rows x {S}")
    return placed


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


# ------------------------------------------------------------------------------------------
# Inference: many texts into batches of rows (encode, evaluation, mining).

_MIN_SEQ = 16  # smallest packed row length: fewer shapes for very short texts
_MIN_TEXTS = 8  # smallest number of pooling slots per batch


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Where the texts of one inference batch go.

    index   [m] int64: input positions of the batch's texts; text slot j holds input index[j]
    rows    [m] int: row of each text;  offsets [m] int: its first column in that row
    num_rows, seq_len: the batch's token arrays are [num_rows, seq_len]
    num_slots: pool_index is [1, num_slots] (>= m; the extra slots point at token 0 and their
      outputs are dropped)
    """

    index: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    num_rows: int
    seq_len: int
    num_slots: int


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[BatchPlan]:
    """Inference batches: every text's length is known up front, so rows are filled one at a
    time, nearly full.

    lengths: [n] token counts (EOS included, each >= 1). A batch's row length is the power
    of two >= the longest text left, and it has at most batch_tokens // seq_len rows. Each
    row takes the longest text left, then again and again the longest text left that fits
    its remaining room, until none fits; then the next row opens. (A row is full before the
    next opens, so "the first row with room" is always the open one: first fit, with the
    text chosen to fit best.) Filling them longest-first only (first-fit-decreasing) pads
    far more, because a text a little longer than half a row leaves its row half empty.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.min() < 1:
        raise PackingError("every text needs at least one token (its EOS)")
    order = np.argsort(-lengths, kind="stable")  # ties keep input order: deterministic
    by_rank = lengths[order].tolist()  # descending
    ascending = lengths[order][::-1]
    n = len(order)
    # left[i]: the first text at rank >= i not yet placed (n: none), path-compressed.
    left = list(range(n + 1))

    def first_left(i: int) -> int:
        root = i
        while left[root] != root:
            root = left[root]
        while left[i] != root:
            left[i], i = root, left[i]
        return root

    plans = []
    head = first_left(0)
    while head < n:
        seq = _pow2_at_least(by_rank[head], _MIN_SEQ)
        max_rows = max(1, batch_tokens // seq)
        members, rows, offsets = [], [], []
        used = 0
        while used < max_rows and head < n:
            load = 0
            while True:
                # The longest text left with length <= the room: rank >= n - #(lengths <= room).
                j = first_left(n - int(np.searchsorted(ascending, seq - load, side="right")))
                if j >= n:
                    break
                members.append(int(order[j]))
                rows.append(used)
                offsets.append(load)
                load += by_rank[j]
                left[j] = j + 1
            used += 1
            head = first_left(head)
        plans.append(BatchPlan(
            index=np.asarray(members, np.int64), rows=np.asarray(rows, np.int64),
            offsets=np.asarray(offsets, np.int64),
            # Round rows and slots up to powers of two so the last, partly filled batches
            # of each row length reuse a few compiled shapes.
            num_rows=min(_pow2_at_least(used), max_rows), seq_len=seq,
            num_slots=_pow2_at_least(len(members), _MIN_TEXTS)))
    return plans


def build_batch(plan: BatchPlan, ids: Sequence[np.ndarray], num_rows: int | None = None,
                num_slots: int | None = None) -> dict[str, np.ndarray]:
    """The packed arrays of one plan (layout as mlembed_jax/batch.py, one pack).

    num_rows / num_slots (>= the plan's) pad the pack to a larger shape, so packs of several
    plans with the same seq_len can be stacked. Returns tokens, segment_ids, positions
    [num_rows, seq_len] int32 and pool_index [1, num_slots] int32 (flat row * seq_len + col
    of each text's last token).
    """
    R, S = max(plan.num_rows, num_rows or 0), plan.seq_len
    tokens = np.zeros((R, S), np.int32)
    segment_ids = np.zeros((R, S), np.int32)
    positions = np.zeros((R, S), np.int32)
    pool_index = np.zeros((1, max(plan.num_slots, num_slots or 0)), np.int32)
    next_segment = np.ones(R, np.int32)
    # Texts were placed left to right within each row, so segment ids follow column order.
    for slot, (j, r, o) in enumerate(zip(plan.index, plan.rows, plan.offsets)):
        t = ids[j]
        n = len(t)
        tokens[r, o:o + n] = t
        segment_ids[r, o:o + n] = next_segment[r]
        positions[r, o:o + n] = np.arange(n, dtype=np.int32)
        next_segment[r] += 1
        pool_index[0, slot] = r * S + o + n - 1
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "pool_index": pool_index}
