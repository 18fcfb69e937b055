"""The packed training batch: the one contract between the data pipeline and the train step.

A step's batch is a dict of fixed-shape numpy/jax arrays. It is split into `packs`: one pack
is the unit the data pipeline fills independently and the unit the mesh's batch axes shard
(so a pack never straddles two devices). Every index inside a pack is *pack-local*;
`globalize_slots` turns them into indices over the whole step inside jit.

Sizes (see `BatchGeometry`): P = packs per step, R = rows per pack, S = seq_len,
  T = texts per pack, B = samples per pack, N = max negatives per sample.
All are fixed per run except R, which takes one of a few values (the run's row buckets,
data/plan.py): each step runs at the smallest bucket that holds its packs, and every bucket
is compiled before the first step.

Token arrays, [P * R, S] int32, pack-major (rows p*R .. p*R+R-1 belong to pack p):
  tokens       token ids; 0 on padding (masked out, its value never matters)
  segment_ids  1, 2, ... for the texts of a row in order; 0 = padding. A token attends only
               to earlier tokens with the same (row, segment id).
  positions    position of the token inside its own text (0 at each text's first token).

Text slots, pack-major, T per pack:
  pool_index   [P, T] int32: flat index `row_in_pack * S + col` of each text's last token
               (its EOS) inside its pack. Empty text slots hold 0.
  text_valid   [P, T] bool.

Sample slots, pack-major, B per pack:
  query_text     [P, B] int32 pack-local text slot of the query.
  positive_text  [P, B] int32 pack-local text slot of the positive.
  negative_text  [P, B, N] int32 pack-local text slots of the hard negatives.
  negative_valid [P, B, N] bool (retrieval uses 7, clustering 9, classification 1).
  sample_valid   [P, B] bool; empty sample slots contribute nothing to any loss.
  in_batch       [P, B] bool; True for retrieval samples (in-batch loss applies).
  dataset_id     [P, B] int32 index of the sample's dataset in the manifest order.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """Fixed shapes of one step's batch (see module docstring for the letters)."""

    packs: int  # P
    rows_per_pack: int  # R
    seq_len: int  # S
    texts_per_pack: int  # T
    samples_per_pack: int  # B
    max_negatives: int  # N

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        P, R, S = self.packs, self.rows_per_pack, self.seq_len
        T, B, N = self.texts_per_pack, self.samples_per_pack, self.max_negatives
        i32, b = np.dtype(np.int32), np.dtype(bool)
        return {
            "tokens": ((P * R, S), i32),
            "segment_ids": ((P * R, S), i32),
            "positions": ((P * R, S), i32),
            "pool_index": ((P, T), i32),
            "text_valid": ((P, T), b),
            "query_text": ((P, B), i32),
            "positive_text": ((P, B), i32),
            "negative_text": ((P, B, N), i32),
            "negative_valid": ((P, B, N), b),
            "sample_valid": ((P, B), b),
            "in_batch": ((P, B), b),
            "dataset_id": ((P, B), i32),
        }

    def empty(self) -> dict[str, np.ndarray]:
        """An all-padding batch (every slot invalid) of the right shapes."""
        return {k: np.zeros(s, d) for k, (s, d) in self.shapes().items()}


def row_buckets(data_cfg) -> tuple[int, ...]:
    """data.rows_per_pack as a sorted tuple of row buckets; () = derived from the data."""
    value = data_cfg.rows_per_pack
    buckets = (value,) if isinstance(value, int) else tuple(value)
    return tuple(sorted({int(r) for r in buckets}))


def geometry_from_config(data_cfg, packs: int, rows: int | None = None) -> BatchGeometry:
    """The step's global batch geometry for `packs` packs at `rows` rows per pack.

    ffd: B = samples_per_pack, R = rows (default: the largest of data.rows_per_pack, which
    must then be given; a derived bucket set comes from data/plan.py).
    pad_to_longest: B = samples_per_pack, R = T (one text per row).
    """
    N = int(data_cfg.max_negatives)
    B = int(data_cfg.samples_per_pack)
    T = B * (2 + N)
    if data_cfg.packing == "pad_to_longest":
        R = T
    elif rows is not None:
        R = int(rows)
    elif row_buckets(data_cfg):
        R = row_buckets(data_cfg)[-1]
    else:
        raise ValueError("data.rows_per_pack=() derives the row buckets from the data: take "
                         "the geometries from the data plan (data/plan.py), or give "
                         "data.rows_per_pack=(R1, R2, ...)")
    return BatchGeometry(packs=packs, rows_per_pack=R, seq_len=int(data_cfg.seq_len),
                         texts_per_pack=T, samples_per_pack=B, max_negatives=N)


def check_batch(batch: dict, geometry: BatchGeometry) -> None:
    """Raises ValueError naming every key whose shape or dtype is off."""
    problems = []
    for key, (shape, dtype) in geometry.shapes().items():
        if key not in batch:
            problems.append(f"missing key {key!r}")
            continue
        arr = batch[key]
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
            problems.append(f"{key}: got {arr.dtype}{list(arr.shape)}, want {dtype}{list(shape)}")
    extra = sorted(set(batch) - set(geometry.shapes()))
    if extra:
        problems.append(f"unexpected keys {extra}")
    if problems:
        raise ValueError("batch does not match its geometry: " + "; ".join(problems))


def text_lengths(batch: dict) -> np.ndarray:
    """Real length of every valid text of a host batch (its position at the pool index + 1),
    in pack-major text-slot order: [valid texts] int."""
    P = batch["pool_index"].shape[0]
    pos = np.take_along_axis(batch["positions"].reshape(P, -1), batch["pool_index"], axis=1)
    return (pos + 1)[batch["text_valid"]]


def globalize_slots(batch: dict, geometry: BatchGeometry) -> dict:
    """Pack-local text slots -> step-global text slots, flattened pack-major.

    Works on numpy or jax arrays (inside jit too). Returns
      query_text [P*B], positive_text [P*B], negative_text [P*B, N] (global text slots, i.e.
      indices into the [P*T] pooled texts), and negative_valid, sample_valid, in_batch,
      dataset_id flattened to [P*B] / [P*B, N]; text_valid flattened to [P*T].
    """
    import jax.numpy as jnp  # local import keeps this module numpy-only for data workers

    P, T = geometry.packs, geometry.texts_per_pack
    offset = (jnp.arange(P, dtype=jnp.int32) * T)[:, None]
    out = {
        "query_text": (batch["query_text"] + offset).reshape(-1),
        "positive_text": (batch["positive_text"] + offset).reshape(-1),
        "negative_text": (batch["negative_text"] + offset[:, :, None]).reshape(
            -1, geometry.max_negatives
        ),
        "negative_valid": batch["negative_valid"].reshape(-1, geometry.max_negatives),
        "text_valid": batch["text_valid"].reshape(-1),
    }
    for key in ("sample_valid", "in_batch", "dataset_id"):
        out[key] = batch[key].reshape(-1)
    return out
