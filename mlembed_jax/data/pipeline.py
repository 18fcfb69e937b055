"""The training and validation input pipelines: prepared data -> packed fixed-shape batches.

Order (all of it from schedule.py, pure in (seed, epoch, step)):
  * each dataset's rows are split once into train / held-out (data.split_seed);
  * an epoch has ceil(train_rows / G) batches per dataset (G = packs * samples_per_pack
    nominal samples per step); the steps' datasets are a seeded shuffle of that multiset,
    i.e. each step picks a dataset weighted by its remaining batches, and the epoch ends when
    all are exhausted;
  * batch k of dataset d hands pack p the rows order[k*G + p*b : k*G + (p+1)*b] of that
    epoch's shuffled order (b = data.samples_per_pack), and each sample's hard negatives are
    drawn by task type, keyed by (seed, epoch, dataset, row).

Carry-over (the one piece of state besides the step): a pack has b + data.spare_sample_slots
sample slots. It takes the samples carried over from its previous batch of the same dataset
first, then its new ones, and keeps the longest prefix that fits its rows (packing.py). The
rest is carried to the next batch of that dataset on that pack (into the next epoch if need
be). The spare slots let the backlog drain, so nothing is dropped and the per-pack sample
count averages b. The carry lists are in the iterator state, so resume is exact.

Each process builds only its own packs [pack_start, pack_stop) of every step.
This module imports no jax: it may run in grain workers or threads.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import grain
import numpy as np

from mlembed_jax.batch import BatchGeometry, geometry_from_config
from mlembed_jax.data import packing, schedule
from mlembed_jax.data.prepare import DataError
from mlembed_jax.data.prepared import PreparedData, PreparedDataset, load_prepared

STATE_VERSION = 1
_VALIDATION_EPOCH = 2**31 - 1  # negatives key of the held-out split: fixed, never a train epoch


def _local_geometry(geometry: BatchGeometry, pack_start: int, pack_stop: int) -> BatchGeometry:
    return dataclasses.replace(geometry, packs=pack_stop - pack_start)


class _Packer:
    """Gathers a dataset's samples and writes them into packs of a local batch."""

    def __init__(self, data: PreparedData, geometry: BatchGeometry, mode: str, seed: int):
        self.data, self.geometry, self.mode, self.seed = data, geometry, mode, seed
        self.num_negatives = []
        for ds in data.datasets:
            if ds.spec.num_negatives > geometry.max_negatives:
                raise DataError(f"dataset {ds.name!r} asks for {ds.spec.num_negatives} "
                                f"negatives but data.max_negatives={geometry.max_negatives}")
            self.num_negatives.append(min(ds.spec.num_negatives, ds.available_negatives))

    def negatives(self, ds: PreparedDataset, epoch: int, rows: np.ndarray) -> np.ndarray:
        return schedule.choose_negatives(self.seed, epoch, ds.dataset_id, rows,
                                         ds.available_negatives,
                                         self.num_negatives[ds.dataset_id])

    def lengths(self, ds: PreparedDataset, rows: np.ndarray, neg_cols: np.ndarray):
        """[C, 2 + n] text lengths and [C, 1 + n] corpus rows of candidate samples."""
        cols = np.concatenate([np.zeros((len(rows), 1), np.int64), neg_cols], axis=1)
        doc = ds.doc_rows[rows[:, None], cols]
        lens = np.concatenate([ds.q_lengths[rows][:, None], self.data.corpus.lengths[doc]],
                              axis=1)
        return lens, doc

    def plan(self, ds: PreparedDataset, epoch: int, rows: np.ndarray):
        neg = self.negatives(ds, epoch, rows)
        lens, doc = self.lengths(ds, rows, neg)
        m, r, o = packing.plan_pack(lens, self.geometry, self.mode)
        return m, r, o, lens, doc

    def fill(self, batch: dict, p: int, ds: PreparedDataset, rows: np.ndarray, doc, lens,
             m: int, r, o) -> tuple[int, list[int]]:
        """Writes the first m planned samples into pack p; returns (real tokens, lengths)."""
        c = self.data.corpus
        K = lens.shape[1]
        texts = []
        for i in range(m):
            row = rows[i]
            texts.append(ds.q_tokens[ds.q_offsets[row]:ds.q_offsets[row + 1]])
            for d in doc[i]:
                texts.append(c.tokens[c.offsets[d]:c.offsets[d + 1]])
        real = packing.fill_pack(batch, p, self.geometry, texts, K, r, o,
                                 num_negatives=K - 2, dataset_id=ds.dataset_id,
                                 in_batch=ds.spec.in_batch)
        return real, lens[:m].reshape(-1).tolist()


class PackedTrainIterator(grain.DatasetIterator):
    """Yields (batch, stats) forever; epochs follow each other. See the module docstring.

    batch: dict of numpy arrays shaped by `self.geometry` (this process's packs only).
    stats: small dict of Python scalars for this step (dataset, real_tokens,
      padding_fraction, padding_fraction_longest, samples, new_samples, carried_over,
      carry_backlog, texts, epoch, step); the running totals are in `self.totals`.
    get_state()/set_state(): a JSON-serialisable dict (step, carry lists, totals).
    """

    def __init__(self, data: PreparedData, data_cfg, global_geometry: BatchGeometry,
                 pack_start: int, pack_stop: int):
        super().__init__()
        if not 0 <= pack_start < pack_stop <= global_geometry.packs:
            raise ValueError(f"pack range [{pack_start}, {pack_stop}) is outside the "
                             f"{global_geometry.packs} packs of a step")
        self.data = data
        self.global_geometry = global_geometry
        self.geometry = _local_geometry(global_geometry, pack_start, pack_stop)
        self.pack_start, self.pack_stop = pack_start, pack_stop
        self.seed = int(data_cfg.seed)
        self.mode = data_cfg.packing
        self.nominal = int(data_cfg.samples_per_pack)
        self._packer = _Packer(data, self.geometry, self.mode, self.seed)
        self.train_rows = [tr for tr, _ in schedule.dataset_splits(data.datasets, data_cfg)]
        G = global_geometry.packs * self.nominal
        for ds, tr in zip(data.datasets, self.train_rows):
            if len(tr) < G:
                raise DataError(
                    f"dataset {ds.name!r} ({ds.path}) has {len(tr)} training rows "
                    f"({ds.num_rows} minus {ds.num_rows - len(tr)} held out), fewer than one "
                    f"batch of {G} samples ({global_geometry.packs} packs x {self.nominal}); "
                    "remove it from the manifest or use fewer packs/samples per pack")
        self.batches_per_dataset = [math.ceil(len(tr) / G) for tr in self.train_rows]
        self.steps_per_epoch = sum(self.batches_per_dataset)
        self._epoch_cache: dict = {}
        self._step = 0
        self._carry: dict[str, dict[str, list[int]]] = {}
        self.totals = {"samples": 0, "real_tokens": 0, "cells": 0, "carried_over": 0}

    # -- pure schedule, cached per epoch
    def _epoch(self, epoch: int):
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()  # one epoch at a time keeps memory flat
            order, k = schedule.epoch_order(self.seed, epoch, self.batches_per_dataset)
            self._epoch_cache[epoch] = {"order": order, "k": k, "rows": {}}
        return self._epoch_cache[epoch]

    def _dataset_order(self, epoch: int, d: int) -> np.ndarray:
        e = self._epoch(epoch)
        if d not in e["rows"]:
            e["rows"][d] = schedule.sample_order(self.seed, epoch, d, self.train_rows[d])
        return e["rows"][d]

    def __next__(self):
        step = self._step
        epoch, s = divmod(step, self.steps_per_epoch)
        e = self._epoch(epoch)
        d, k = int(e["order"][s]), int(e["k"][s])
        ds = self.data.datasets[d]
        order = self._dataset_order(epoch, d)
        G, b = self.global_geometry.packs * self.nominal, self.nominal
        batch = self.geometry.empty()
        carry = self._carry.setdefault(ds.name, {})
        samples = new = deferred = real = 0
        lengths: list[int] = []
        for p in range(self.pack_start, self.pack_stop):
            fresh = order[k * G + p * b: k * G + (p + 1) * b]
            old = carry.pop(str(p), [])
            rows = np.concatenate([np.asarray(old, np.int64), fresh.astype(np.int64)])
            new += len(fresh)
            if not len(rows):
                continue
            m, r, o, lens, doc = self._packer.plan(ds, epoch, rows)
            pr, pl = self._packer.fill(batch, p - self.pack_start, ds, rows, doc, lens, m, r, o)
            real += pr
            lengths += pl
            samples += m
            if m < len(rows):
                carry[str(p)] = rows[m:].tolist()
                deferred += len(rows) - m
        backlog = sum(len(v) for c in self._carry.values() for v in c.values())
        cells = batch["tokens"].size
        stats = {"step": step, "epoch": epoch, "dataset": ds.name, "dataset_id": d,
                 "samples": samples, "new_samples": new, "carried_over": deferred,
                 "carry_backlog": backlog, **packing.padding_stats(real, cells, lengths)}
        self.totals["samples"] += samples
        self.totals["real_tokens"] += real
        self.totals["cells"] += cells
        self.totals["carried_over"] += deferred
        self._step = step + 1
        return batch, stats

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, "seed": self.seed,
                "packs": self.global_geometry.packs,
                "pack_range": [self.pack_start, self.pack_stop],
                "datasets": list(self.data.names),
                "carry": copy.deepcopy({n: c for n, c in self._carry.items() if c}),
                "totals": dict(self.totals)}

    def set_state(self, state: dict) -> None:
        want = self.get_state()
        for key in ("version", "seed", "packs", "pack_range", "datasets"):
            if list(np.atleast_1d(state.get(key))) != list(np.atleast_1d(want[key])):
                raise ValueError(f"data iterator state does not match this pipeline: {key}="
                                 f"{state.get(key)!r} in the state, {want[key]!r} here "
                                 "(resume needs the same seed, datasets and pack layout)")
        self._step = int(state["step"])
        self._carry = {n: {str(p): [int(x) for x in v] for p, v in c.items()}
                       for n, c in state["carry"].items()}
        self.totals = {k: int(v) for k, v in state["totals"].items()}

    def summary(self) -> str:
        t = self.totals
        pad = 1 - t["real_tokens"] / t["cells"] if t["cells"] else 0.0
        backlog = sum(len(v) for c in self._carry.values() for v in c.values())
        return (f"{self._step} steps, {t['samples']} samples packed, {t['real_tokens']} real "
                f"tokens, padding {pad:.1%}, {t['carried_over']} sample deferrals "
                f"(carried over, none dropped), {backlog} samples waiting")


class _TrainDataset(grain.IterDataset):
    def __init__(self, make):
        super().__init__()
        self._make = make

    def __iter__(self):
        return self._make()


class TrainIterator:
    """What the training loop holds: next() -> (batch, stats); get_state / set_state.

    Wraps PackedTrainIterator in grain's thread prefetch when prefetch > 0 (the state then
    still describes the last batch handed out, not the ones prefetched).
    """

    def __init__(self, inner: PackedTrainIterator, prefetch: int):
        self.inner = inner
        self.geometry = inner.geometry
        self.global_geometry = inner.global_geometry
        self.steps_per_epoch = inner.steps_per_epoch
        self.dataset_names = inner.data.names
        if prefetch > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                _TrainDataset(lambda: inner), prefetch_buffer_size=prefetch)
            self._it = iter(ds)
        else:
            self._it = inner

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return copy.deepcopy(self._it.get_state())

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def close(self):
        if self._it is not self.inner:
            self._it.close()


def make_train_iterator(config, packs: int, *, pack_range: tuple[int, int] | None = None,
                        data: PreparedData | None = None,
                        prefetch: int | None = None) -> TrainIterator:
    """The training iterator of one process.

    config: the run config (uses config.data). packs: P, packs per step over all processes.
    The process builds packs [start, stop) = pack_range (default: all of them;
    sharding.process_pack_range derives a process's range from the mesh).
    """
    dc = config.data if hasattr(config, "data") else config
    if data is None:
        data = load_prepared(dc.prepared_dir, int(dc.seq_len), dc.manifest)
    start, stop = pack_range or (0, packs)
    inner = PackedTrainIterator(data, dc, geometry_from_config(dc, packs), start, stop)
    if prefetch is None:
        prefetch = int(dc.get("prefetch", 2))
    return TrainIterator(inner, prefetch)


class ValidationBatches:
    """Fixed batches over the held-out split; iterate it as often as needed.

    Every dataset's held-out rows, in sorted order, go through the same packing as training,
    with fixed negatives. The plan (which rows land in which pack of which batch, including
    carry-over) is computed for all packs from lengths alone, so every process agrees on the
    number of batches. Yields (batch, stats) with this process's packs.
    """

    def __init__(self, data: PreparedData, data_cfg, global_geometry: BatchGeometry,
                 pack_start: int, pack_stop: int):
        self.data = data
        self.global_geometry = global_geometry
        self.geometry = _local_geometry(global_geometry, pack_start, pack_stop)
        self.pack_start, self.pack_stop = pack_start, pack_stop
        mode, b = data_cfg.packing, int(data_cfg.samples_per_pack)
        plan_geometry = _local_geometry(global_geometry, 0, 1)
        self._packer = _Packer(data, self.geometry, mode, int(data_cfg.seed))
        self._planner = _Packer(data, plan_geometry, mode, int(data_cfg.seed))
        P = global_geometry.packs
        self.plan = []  # (dataset id, {local pack: rows})
        for d, (_, val) in enumerate(schedule.dataset_splits(data.datasets, data_cfg)):
            ds = data.datasets[d]
            per_pack = []  # per pack: list of row arrays, one per batch
            for p in range(P):
                batches, carry, k = [], np.zeros(0, np.int64), 0
                nominal = [val[k * P * b + p * b: k * P * b + (p + 1) * b]
                           for k in range(math.ceil(len(val) / (P * b)))]
                while k < len(nominal) or len(carry):
                    rows = np.concatenate([carry, nominal[k] if k < len(nominal)
                                           else np.zeros(0, np.int64)]).astype(np.int64)
                    m = self._planner.plan(ds, _VALIDATION_EPOCH, rows)[0] if len(rows) else 0
                    batches.append(rows[:m])
                    carry = rows[m:]
                    k += 1
                per_pack.append(batches)
            for j in range(max((len(x) for x in per_pack), default=0)):
                self.plan.append((d, {p - pack_start: per_pack[p][j] for p in
                                      range(pack_start, pack_stop) if j < len(per_pack[p])}))

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for i, (d, packs) in enumerate(self.plan):
            ds = self.data.datasets[d]
            batch = self.geometry.empty()
            real, lengths, samples = 0, [], 0
            for p, rows in packs.items():
                if not len(rows):
                    continue
                m, r, o, lens, doc = self._packer.plan(ds, _VALIDATION_EPOCH, rows)
                assert m == len(rows), "validation plan and packing disagree"
                pr, pl = self._packer.fill(batch, p, ds, rows, doc, lens, m, r, o)
                real += pr
                lengths += pl
                samples += m
            yield batch, {"index": i, "dataset": ds.name, "dataset_id": d, "samples": samples,
                          **packing.padding_stats(real, batch["tokens"].size, lengths)}


def make_validation_iterator(config, packs: int, *, pack_range: tuple[int, int] | None = None,
                             data: PreparedData | None = None) -> ValidationBatches:
    """Deterministic batches over the held-out split (re-iterable; same every time)."""
    dc = config.data if hasattr(config, "data") else config
    if data is None:
        data = load_prepared(dc.prepared_dir, int(dc.seq_len), dc.manifest)
    start, stop = pack_range or (0, packs)
    return ValidationBatches(data, dc, geometry_from_config(dc, packs), start, stop)
