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


HOLDOUT_RULES = ("reference", "floor")
MIXING_RULES = ("static", "batches_left")


def split_rows(num_rows: int, name: str, split_seed: int, fraction: float,
               min_count: int, min_train: int = 0,
               rule: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split -> (train_rows, validation_rows), both sorted int64.

    rule "reference": n - floor((1 - fraction) * n) rows held out, the reference's
    train_test_split(train_size=0.99) at fraction 0.01 (one row when n < 100); a one-row
    dataset, which that split rejects, trains its row. min_count and min_train are unused.
    rule "floor": ceil(fraction * n), raised to min_count for tiny datasets but never above
    half the rows, and never so high that fewer than min_train rows are left to train (a tiny
    dataset holds out less, down to nothing). Either way fraction 0 holds nothing out.
    """
    if rule not in HOLDOUT_RULES:
        raise ValueError(f"holdout rule {rule!r} must be one of {HOLDOUT_RULES}")
    if fraction <= 0:
        n_val = 0
    elif rule == "reference":
        n_val = num_rows - math.floor((1.0 - fraction) * num_rows)
        if n_val >= num_rows:
            n_val = 0
    else:
        n_val = min(max(math.ceil(fraction * num_rows), min_count), num_rows // 2)
        n_val = max(0, min(n_val, num_rows - min_train))
    rng = np.random.default_rng([split_seed, name_key(name), 0x5B1])
    perm = rng.permutation(num_rows)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def dataset_splits(datasets, data_cfg) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_rows, validation_rows) of each dataset (objects with .num_rows and .name), by
    the config's data.holdout rule, split_seed, validation_fraction and (rule "floor")
    min_validation_samples. Neither rule depends on the mesh."""
    return [split_rows(ds.num_rows, ds.name, int(data_cfg.get("split_seed", 0)),
                       float(data_cfg.validation_fraction),
                       int(data_cfg.get("min_validation_samples", 0)),
                       min_train=int(data_cfg.samples_per_pack),
                       rule=data_cfg.get("holdout", "reference"))
            for ds in datasets]


def _within_dataset_index(labels: np.ndarray, num_datasets: int) -> np.ndarray:
    """[steps] int64: how many earlier steps drew the same dataset."""
    k = np.zeros(len(labels), np.int64)
    for d in range(num_datasets):
        idx = np.flatnonzero(labels == d)
        k[idx] = np.arange(len(idx))
    return k


def epoch_order(seed: int, epoch: int, batches: list[int],
                rule: str = "static") -> tuple[np.ndarray, np.ndarray]:
    """Which dataset each step of an epoch uses, and that step's batch index in the dataset.

    rule "static", the reference's loop: draw a dataset with probability proportional to its
    batch count at the epoch's start (fixed all epoch); a draw of an exhausted dataset
    yields nothing and removes it. So each batch comes from the datasets not yet exhausted,
    with probabilities n_d / (sum of their n). Give dataset d a Poisson process of rate n_d
    and keep its first n_d arrivals (the k-th at the sum of k Exp(n_d) gaps, a Gamma(k, n_d)
    time): by memorylessness the next arrival among the processes still running is d's with
    exactly that probability, whatever came before, so sorting the arrival times draws the
    whole order at once. (Independent Gamma(k) draws per k would not: the gaps must be
    shared.) Small datasets then come late in an epoch, as in the reference.

    rule "batches_left": a uniformly random ordering of the multiset {d repeated batches[d]
    times}, i.e. "pick a dataset weighted by its remaining batches" at every step.
    Both are pure functions of (seed, epoch, batches): a resumed run recomputes the order.
    Returns (dataset [steps] int32, batch_in_dataset [steps] int64).
    """
    batches = [int(b) for b in batches]
    labels = np.repeat(np.arange(len(batches), dtype=np.int32), batches)
    if rule == "batches_left":
        rng = np.random.default_rng([seed, epoch, 0xD5])
        rng.shuffle(labels)
        return labels, _within_dataset_index(labels, len(batches))
    if rule != "static":
        raise ValueError(f"mixing rule {rule!r} must be one of {MIXING_RULES}")
    rng = np.random.default_rng([seed, epoch, 0xD6])
    gaps = rng.standard_exponential(len(labels))
    times = np.empty(len(labels))
    k = np.empty(len(labels), np.int64)
    start = 0
    for n in batches:
        times[start:start + n] = np.cumsum(gaps[start:start + n]) / n
        k[start:start + n] = np.arange(n)
        start += n
    order = np.argsort(times, kind="stable")
    return labels[order], k[order]


def sample_order(seed: int, epoch: int, dataset_id: int, rows: np.ndarray) -> np.ndarray:
    """The dataset's training rows in this epoch's shuffled order."""
    rng = np.random.default_rng([seed, epoch, dataset_id, 0x5A])
    return rows[rng.permutation(len(rows))]


def choose_negatives(seed: int, epoch: int, dataset_id: int, rows: np.ndarray,
                     available: int, count: int, task_type: str = "retrieval",
                     batches: np.ndarray | None = None) -> np.ndarray:
    """Negative columns (1-based into negative_1..K) per sample: [len(rows), count].

    Classification always takes the first `count` columns (the recipe: negative_1). Other
    tasks take `count` of the `available` columns without replacement, in random order: a
    uniform draw like the reference's random.sample(range(24), count). batches [len(rows)]
    int, each row's batch index in the dataset's epoch: one draw per batch, shared by all of
    its samples (the reference's collate_fn draws once per step). batches None: one draw per
    sample, keyed per (seed, epoch, dataset, row) so a sample gets the same negatives
    wherever it lands in the epoch. Pure in its arguments either way, so resume is exact.
    """
    count = min(count, available)
    if count == available or task_type == "classification":
        return np.broadcast_to(np.arange(1, count + 1), (len(rows), count))
    cols = np.arange(available)[None]
    if batches is None:
        keys = mix64(seed, epoch, dataset_id, np.asarray(rows)[:, None], cols)
        return np.argsort(keys, axis=1, kind="stable")[:, :count] + 1
    # Sorting iid hashes is a uniform permutation; its first `count` a uniform ordered draw.
    uniq, inverse = np.unique(np.asarray(batches, np.int64), return_inverse=True)
    keys = mix64(seed, epoch, dataset_id, 0x5E7, uniq[:, None], cols)
    return (np.argsort(keys, axis=1, kind="stable")[:, :count] + 1)[inverse.reshape(-1)]
