"""The training and validation input pipelines: prepared data -> packed batches.

What each step holds comes from the data plan (plan.py, pure in the seed, the epoch and the
prepared lengths): its dataset, its samples dealt to packs, and its row bucket R. Here those
samples' tokens are gathered and packed first-fit-decreasing into this process's packs
[pack_start, pack_stop) of a [packs * R, seq_len] batch (packing.py, batch.py). An epoch
trains every training row once at data.samples_per_pack samples per pack; nothing is carried
over from one step to another, so the iterator's state is its step and running totals.

This module imports no jax: it may run in grain workers or threads.
"""

from __future__ import annotations

import copy
import dataclasses

import grain
import numpy as np

from mlembed_jax.batch import BatchGeometry
from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data import packing
from mlembed_jax.data.parquet_io import DataError
from mlembed_jax.data.plan import DataPlan, StepPlan, make_data_plan
from mlembed_jax.data.prepared import PreparedData

# 2: no carry-over (version 1 carried samples between steps and cannot resume exactly here).
STATE_VERSION = 2
# The data rules of a version-2 state that does not record them: the only ones that existed.
_RULES_BEFORE_RECORDED = {"holdout": "floor", "mixing": "batches_left",
                          "negatives_draw": "per_sample"}


def _fill(plan: DataPlan, step: StepPlan, pack_start: int, pack_stop: int):
    """This process's packs of a planned step -> (local batch, stats)."""
    geometry = dataclasses.replace(plan.geometry(step.rows_per_pack),
                                   packs=pack_stop - pack_start)
    batch = geometry.empty()
    ds = plan.data.datasets[step.dataset_id]
    c = plan.data.corpus
    K = step.lengths.shape[1]
    real, samples, lengths = 0, 0, []
    for p in range(pack_start, pack_stop):
        idx = step.packs[p]
        if not len(idx):
            continue
        lens = step.lengths[idx]
        try:
            rows, offsets = packing.plan_pack(lens, geometry, plan.mode)
        except packing.PackingError as e:  # the plan said it fits: a bug, not bad data
            raise RuntimeError(f"step {step.step}: the data plan and the packer disagree: "
                               f"{e}") from None
        texts = []
        for i in idx:
            r = step.rows[i]
            texts.append(ds.q_tokens[ds.q_offsets[r]:ds.q_offsets[r + 1]])
            for d in step.doc[i]:
                texts.append(c.tokens[c.offsets[d]:c.offsets[d + 1]])
        real += packing.fill_pack(batch, p - pack_start, geometry, texts, K, rows, offsets,
                                  num_negatives=K - 2, dataset_id=ds.dataset_id,
                                  in_batch=ds.spec.in_batch)
        samples += len(idx)
        lengths += lens.reshape(-1).tolist()
    stats = {"dataset": ds.name, "dataset_id": step.dataset_id, "rows": step.rows_per_pack,
             "samples": samples, "step_samples": len(step.rows), "partial": step.partial,
             **packing.padding_stats(real, batch["tokens"].size, lengths)}
    return batch, stats


class PackedTrainIterator(grain.DatasetIterator):
    """Yields (batch, stats) forever; epochs follow each other. See the module docstring.

    batch: dict of numpy arrays shaped by the step's bucket (this process's packs only).
    stats: small dict of Python scalars for this step: step, epoch, dataset, dataset_id, rows
      (the bucket R), samples (this process's packs), step_samples (all packs), partial,
      real_tokens, padding_fraction, padding_fraction_longest, texts; at an epoch's last step
      also `epoch_end`, that epoch's coverage (`epoch_summary`).
    get_state()/set_state(): a JSON-serialisable dict (step, running and per-epoch totals).
    """

    def __init__(self, plan: DataPlan, pack_start: int, pack_stop: int):
        super().__init__()
        if not 0 <= pack_start < pack_stop <= plan.packs:
            raise ValueError(f"pack range [{pack_start}, {pack_stop}) is outside the "
                             f"{plan.packs} packs of a step")
        self.plan = plan
        self.data = plan.data
        self.pack_start, self.pack_stop = pack_start, pack_stop
        self.steps_per_epoch = plan.steps_per_epoch
        self._step = 0
        self.totals = {"samples": 0, "real_tokens": 0, "cells": 0, "partial_batches": 0}
        self._epoch_counts = self._fresh_epoch_counts()

    @staticmethod
    def _fresh_epoch_counts() -> dict:
        return {"samples": 0, "steps": 0, "partial_batches": 0, "steps_by_rows": {}}

    def negatives_summary(self) -> list[str]:
        """Per dataset: task type and the hard negatives each sample gets."""
        out = []
        for ds, n in zip(self.data.datasets, self.plan.num_negatives):
            default = manifest_lib.DEFAULT_NEGATIVES.get(ds.spec.task_type, n)
            note = "" if n == default else f" (manifest num_negatives; default {default})"
            out.append(f"{ds.name}: {ds.spec.task_type}, {n} negative{'s' * (n != 1)}{note}")
        return out

    def __next__(self):
        step = self._step
        planned = self.plan.step(step)
        batch, stats = _fill(self.plan, planned, self.pack_start, self.pack_stop)
        stats = {"step": step, "epoch": planned.epoch, **stats}
        self.totals["samples"] += stats["samples"]
        self.totals["real_tokens"] += stats["real_tokens"]
        self.totals["cells"] += batch["tokens"].size
        self.totals["partial_batches"] += int(planned.partial)
        ec = self._epoch_counts
        ec["samples"] += stats["step_samples"]
        ec["steps"] += 1
        ec["partial_batches"] += int(planned.partial)
        key = str(planned.rows_per_pack)  # str: the state is JSON
        ec["steps_by_rows"][key] = ec["steps_by_rows"].get(key, 0) + 1
        self._step = step + 1
        if self._step % self.steps_per_epoch == 0:
            stats["epoch_end"] = self.epoch_summary(planned.epoch)
            self._epoch_counts = self._fresh_epoch_counts()
        return batch, stats

    def epoch_summary(self, epoch: int) -> dict:
        """Coverage of the epoch so far: samples handed to packs (all processes) against the
        epoch's training rows, partial batches, and steps per row bucket."""
        ec = self._epoch_counts
        return {"epoch": epoch, "samples": ec["samples"], "train_samples":
                self.plan.train_samples, "coverage": ec["samples"] / max(self.plan.train_samples,
                                                                          1),
                "steps": ec["steps"], "partial_batches": ec["partial_batches"],
                "steps_by_rows": {int(k): v for k, v in sorted(ec["steps_by_rows"].items(),
                                                               key=lambda kv: int(kv[0]))}}

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, "seed": self.plan.seed,
                "packs": self.plan.packs, "samples_per_pack": self.plan.samples_per_pack,
                "pack_range": [self.pack_start, self.pack_stop],
                "datasets": list(self.data.names), "rules": dict(self.plan.rules),
                "totals": dict(self.totals),
                "epoch_counts": copy.deepcopy(self._epoch_counts)}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"the checkpoint's data iterator state has version {state.get('version')!r}, "
                f"this pipeline resumes version {STATE_VERSION} only (version 1 carried "
                "samples over between steps and cannot be continued exactly). Start a fresh "
                "--workdir with --config.train.init_from=<the old workdir> to keep its weights")
        want = self.get_state()
        for key in ("seed", "packs", "samples_per_pack", "pack_range", "datasets"):
            if list(np.atleast_1d(state.get(key))) != list(np.atleast_1d(want[key])):
                raise DataError(f"data iterator state does not match this pipeline: {key}="
                                f"{state.get(key)!r} in the state, {want[key]!r} here "
                                "(resume needs the same seed, datasets and pack layout)")
        rules = state.get("rules", _RULES_BEFORE_RECORDED)
        differ = {k: v for k, v in rules.items() if self.plan.rules.get(k) != v}
        if differ:
            flags = " ".join(f"--config.data.{k}={v}" for k, v in differ.items())
            raise DataError(
                "data iterator state was planned with other data rules ("
                + ", ".join(f"data.{k}={v!r}, here {self.plan.rules.get(k)!r}"
                            for k, v in differ.items())
                + f"); resume with {flags} to continue its order exactly")
        self._step = int(state["step"])
        self.totals = {k: int(v) for k, v in state["totals"].items()}
        ec = state["epoch_counts"]
        self._epoch_counts = {"samples": int(ec["samples"]), "steps": int(ec["steps"]),
                              "partial_batches": int(ec["partial_batches"]),
                              "steps_by_rows": {str(k): int(v)
                                                for k, v in ec["steps_by_rows"].items()}}

    def summary(self) -> str:
        t = self.totals
        pad = 1 - t["real_tokens"] / t["cells"] if t["cells"] else 0.0
        return (f"{self._step} steps, {t['samples']} samples packed on this process, "
                f"{t['real_tokens']} real tokens, padding {pad:.1%}, {t['partial_batches']} "
                "partial batches; nothing carried over")


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
        self.plan = inner.plan
        self.steps_per_epoch = inner.steps_per_epoch
        self.dataset_names = inner.data.names
        self.negatives_summary = inner.negatives_summary
        if prefetch > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                _TrainDataset(lambda: inner), prefetch_buffer_size=prefetch)
            self._it = iter(ds)
        else:
            self._it = inner

    @property
    def global_geometry(self) -> BatchGeometry:
        """The largest bucket's global geometry (what the memory report covers)."""
        return self.plan.geometry()

    @property
    def geometry(self) -> BatchGeometry:
        """The largest bucket's geometry of this process's packs."""
        return dataclasses.replace(self.plan.geometry(),
                                   packs=self.inner.pack_stop - self.inner.pack_start)

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
                        data: PreparedData | None = None, plan: DataPlan | None = None,
                        prefetch: int | None = None) -> TrainIterator:
    """The training iterator of one process.

    config: the run config (uses config.data; config.train, when present, for how many
    epochs to plan). packs: P, packs per step over all processes. The process builds packs
    [start, stop) = pack_range (default: all of them; sharding.process_pack_range derives a
    process's range from the mesh). plan: the run's DataPlan (built here when not given).
    """
    dc = config.data if hasattr(config, "data") else config
    if plan is None:
        plan = make_data_plan(config, packs, data)
    elif plan.packs != packs:
        raise ValueError(f"the data plan has {plan.packs} packs per step, not {packs}")
    start, stop = pack_range or (0, packs)
    inner = PackedTrainIterator(plan, start, stop)
    if prefetch is None:
        prefetch = int(dc.get("prefetch", 2))
    return TrainIterator(inner, prefetch)


class ValidationBatches:
    """Fixed batches over the held-out split; iterate it as often as needed.

    Every dataset's held-out rows, in sorted order, in batches of packs x samples_per_pack
    (the last one partial), dealt and packed like training steps at the plan's row buckets,
    with fixed negatives. Yields (batch, stats) with this process's packs.
    """

    def __init__(self, plan: DataPlan, pack_start: int, pack_stop: int):
        self.plan = plan
        self.pack_start, self.pack_stop = pack_start, pack_stop

    def __len__(self) -> int:
        return len(self.plan.validation)

    def __iter__(self):
        for j in range(len(self.plan.validation)):
            batch, stats = _fill(self.plan, self.plan.validation_step(j), self.pack_start,
                                 self.pack_stop)
            yield batch, {"index": j, **stats}


def make_validation_iterator(config, packs: int, *, pack_range: tuple[int, int] | None = None,
                             data: PreparedData | None = None,
                             plan: DataPlan | None = None) -> ValidationBatches:
    """Deterministic batches over the held-out split (re-iterable; same every time)."""
    if plan is None:
        plan = make_data_plan(config, packs, data)
    start, stop = pack_range or (0, packs)
    return ValidationBatches(plan, start, stop)
