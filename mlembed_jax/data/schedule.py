"""The pure part of the data order: every choice is a function of (seed, epoch, indices).

Nothing here keeps state, so any step's dataset, sample rows and negatives can be recomputed
from scratch: that is what makes resume exact and processes agree without talking.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def name_key(name: str) -> int:
    """A stable 32-bit integer for a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def mix64(*keys) -> np.ndarray:
    """Splitmix64-style hash of integer keys (scalars or broadcastable arrays) -> uint64."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in keys:
            h = np.asarray(h, np.uint64) ^ np.asarray(k, np.int64).astype(np.uint64)
            h = (h + np.uint64(0x9E3779B97F4A7C15)) & _M
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


def split_rows(num_rows: int, name: str, split_seed: int, fraction: float,
               min_count: int, min_train: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split -> (train_rows, validation_rows), both sorted int64.

    The held-out count is ceil(fraction * n), raised to min_count for tiny datasets but never
    above half the rows, and never so high that fewer than min_train rows are left to train
    (a tiny dataset holds out less, down to nothing); fraction 0 holds nothing out.
    """
    if fraction <= 0:
        n_val = 0
    else:
        n_val = min(max(math.ceil(fraction * num_rows), min_count), num_rows // 2)
        n_val = max(0, min(n_val, num_rows - min_train))
    rng = np.random.default_rng([split_seed, name_key(name), 0x5B1])
    perm = rng.permutation(num_rows)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def dataset_splits(datasets, data_cfg) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_rows, validation_rows) of each dataset (objects with .num_rows and .name), by
    the config's data.split_seed, validation_fraction and min_validation_samples. The split
    leaves every dataset at least one pack's batch (data.samples_per_pack) of training rows,
    so it does not depend on the mesh."""
    return [split_rows(ds.num_rows, ds.name, int(data_cfg.get("split_seed", 0)),
                       float(data_cfg.validation_fraction),
                       int(data_cfg.get("min_validation_samples", 0)),
                       min_train=int(data_cfg.samples_per_pack))
            for ds in datasets]


def epoch_order(seed: int, epoch: int, batches: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset each step of an epoch uses, and that step's batch index in the dataset.

    A uniformly random ordering of the multiset {d repeated batches[d] times} is exactly
    "pick a dataset at random weighted by its remaining batches" at every step.
    Returns (dataset [steps] int32, batch_in_dataset [steps] int64).
    """
    labels = np.repeat(np.arange(len(batches), dtype=np.int32), batches)
    rng = np.random.default_rng([seed, epoch, 0xD5])
    rng.shuffle(labels)
    k = np.zeros(len(labels), np.int64)
    for d in range(len(batches)):
        idx = np.flatnonzero(labels == d)
        k[idx] = np.arange(len(idx))
    return labels, k


def sample_order(seed: int, epoch: int, dataset_id: int, rows: np.ndarray) -> np.ndarray:
    """The dataset's training rows in this epoch's shuffled order."""
    rng = np.random.default_rng([seed, epoch, dataset_id, 0x5A])
    return rows[rng.permutation(len(rows))]


def choose_negatives(seed: int, epoch: int, dataset_id: int, rows: np.ndarray,
                     available: int, count: int, task_type: str = "retrieval") -> np.ndarray:
    """Negative columns (1-based into negative_1..K) per sample: [len(rows), count].

    Classification always takes the first `count` columns (the recipe: negative_1). Other
    tasks sample without replacement, keyed per (seed, epoch, dataset, row) so a sample gets
    the same negatives wherever it lands in the epoch.
    """
    count = min(count, available)
    if count == available or task_type == "classification":
        return np.broadcast_to(np.arange(1, count + 1), (len(rows), count))
    keys = mix64(seed, epoch, dataset_id, np.asarray(rows)[:, None], np.arange(available)[None])
    return np.argsort(keys, axis=1, kind="stable")[:, :count] + 1
