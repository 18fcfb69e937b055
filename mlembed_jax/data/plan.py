"""The data plan: which samples every step trains, how they are dealt to packs, and the few
step shapes (row buckets) of a run. All of it is a pure function of the prepared token
lengths and the config, so every process computes the same plan without talking, and a
resumed run recomputes it exactly.

Coverage: an epoch trains every training row of every dataset exactly once, B =
data.samples_per_pack samples per pack. A dataset's rows, shuffled per epoch, are cut into
batches of G = packs x B samples; its last batch of the epoch holds the remainder (a partial
batch, counted as such), and a dataset with fewer than G training rows is one partial batch
per epoch. Which dataset each step draws follows data.mixing (schedule.epoch_order): by
default the reference's static weights, each dataset's batch count at the epoch's start.
Nothing is carried over, so nothing is left waiting at an epoch's end. A step's hard
negatives follow data.negatives_draw: by default one draw of columns per step, shared by
its samples, as the reference's collate_fn does.

Dealing: a step's samples are sorted by token count (most first) and dealt to the packs in
snake order (packs 0..P-1, then P-1..0, ...), so each pack gets B samples and about the same
number of tokens. Which pack holds a sample changes no loss: its hard negatives are its own
and the in-batch loss spans the whole step.

Shapes: a pack's texts go into R rows of seq_len by first-fit-decreasing (packing.py), and a
step needs the rows of its fullest pack. The run's row buckets are data.rows_per_pack, or,
when that is (), the data.num_shapes row counts that waste the fewest token cells over every
step the run takes (its training epochs and the validation batches); the largest is the most
any of those steps needs. Each step runs at the smallest bucket that holds it. This module
imports no jax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os

import numpy as np

from mlembed_jax.batch import BatchGeometry, geometry_from_config, row_buckets
from mlembed_jax.data import packing, schedule
from mlembed_jax.data.parquet_io import DataError
from mlembed_jax.data.prepared import PreparedData, load_prepared

VALIDATION_EPOCH = 2**31 - 1  # negatives key of the held-out split: fixed, never a train epoch
_CHUNK_PACKS = 1 << 16  # packs per vectorised FFD call: bounds the planner's memory


def deal_ranks(packs: int, samples_per_pack: int) -> np.ndarray:
    """[P, B]: the token-count rank (0 = most tokens) of each pack's sample slots. Snake
    order: rank r of round i = r // P goes to pack r % P on even rounds, P - 1 - r % P on odd
    ones. Ranks increase along each pack's slots, so a partial step fills slot prefixes."""
    i = np.arange(samples_per_pack)[None, :]
    p = np.arange(packs)[:, None]
    return i * packs + np.where(i % 2 == 0, p, packs - 1 - p)


def deal(totals: np.ndarray, packs: int, samples_per_pack: int) -> list[np.ndarray]:
    """One step's samples dealt to its packs: totals [n] (n <= P*B, tokens per sample) ->
    P index arrays into the samples, each pack's samples in slot order."""
    order = np.argsort(-np.asarray(totals), kind="stable")
    return [order[r[r < len(order)]] for r in deal_ranks(packs, samples_per_pack)]


def step_needs(lengths: np.ndarray, packs: int, samples_per_pack: int,
               seq_len: int) -> np.ndarray:
    """Rows each of many steps needs: lengths [steps, G, K] int (G = P*B samples of K texts;
    an all-zero sample is an empty slot) -> [steps] int, the most rows first-fit-decreasing
    opens in any of the step's packs after `deal`."""
    steps, G, K = lengths.shape
    if G != packs * samples_per_pack:
        raise ValueError(f"{G} samples per step, expected {packs} x {samples_per_pack}")
    ranks = deal_ranks(packs, samples_per_pack).reshape(-1)
    out = np.zeros(steps, np.int64)
    per_chunk = max(1, _CHUNK_PACKS // packs)
    for a in range(0, steps, per_chunk):
        part = lengths[a:a + per_chunk]
        order = np.argsort(-part.sum(-1), axis=1, kind="stable")  # as `deal`, per step
        dealt = np.take_along_axis(part, order[:, ranks, None], axis=1)
        per_pack = dealt.reshape(len(part) * packs, samples_per_pack * K)
        out[a:a + len(part)] = packing.ffd_rows_needed(per_pack, seq_len).reshape(
            len(part), packs).max(axis=1)
    return out


def choose_buckets(needs: np.ndarray, max_shapes: int) -> tuple[int, ...]:
    """At most `max_shapes` row counts that minimise the summed rows of all steps, each step
    at the smallest bucket >= its need; the largest is max(needs). Exact dynamic programme
    over the distinct needs; with equal cost, fewer buckets (fewer compiles) win."""
    vals, counts = np.unique(np.asarray(needs, np.int64), return_counts=True)
    if not len(vals):
        return ()
    V, K = len(vals), max(1, min(int(max_shapes), len(vals)))
    before = np.concatenate([[0], np.cumsum(counts)])  # steps with need < vals[j]: before[j]
    # best[k][j]: least summed rows of the steps with need <= vals[j], with k buckets, the
    # largest at vals[j]; prev[k][j]: index of the (k-1)-th bucket.
    best = np.full((K + 1, V), np.inf)
    prev = np.full((K + 1, V), -1, np.int64)
    best[1] = vals * before[1:]
    for k in range(2, K + 1):
        for j in range(k - 1, V):
            i = np.arange(k - 2, j)
            cost = best[k - 1, i] + vals[j] * (before[j + 1] - before[i + 1])
            t = int(np.argmin(cost))
            best[k, j], prev[k, j] = cost[t], i[t]
    k = min(range(1, K + 1), key=lambda n: (best[n, V - 1], n))
    out, j = [], V - 1
    while k >= 1 and j >= 0:
        out.append(int(vals[j]))
        j, k = prev[k, j], k - 1
    return tuple(sorted(out))


@dataclasses.dataclass
class StepPlan:
    """One step (or validation batch): its dataset, samples, their packs and its shape."""

    step: int  # training step (validation: batch index)
    epoch: int  # VALIDATION_EPOCH for validation batches
    dataset_id: int
    rows: np.ndarray  # [n] the dataset's rows trained here (n <= G)
    doc: np.ndarray  # [n, 1 + negatives] corpus rows: positive, then negatives
    lengths: np.ndarray  # [n, 2 + negatives] token lengths: query, positive, negatives
    packs: list  # P index arrays into `rows`, each pack's samples in slot order
    rows_per_pack: int  # R: this step's row bucket
    partial: bool  # fewer than G samples: a dataset's last batch of the epoch


class DataPlan:
    """The plan of a run (see the module docstring), for `packs` packs per step.

    Plans `epochs` epochs up front (every step's rows needed; the row buckets cover them all)
    plus the validation batches. Later epochs are planned when reached, and one that needs
    more rows than the largest bucket raises DataError then.
    """

    def __init__(self, data: PreparedData, data_cfg, packs: int, epochs: int = 1):
        self.data = data
        self.packs = int(packs)
        self.samples_per_pack = B = int(data_cfg.samples_per_pack)
        self.seq_len = int(data_cfg.seq_len)
        self.max_negatives = int(data_cfg.max_negatives)
        self.mode = data_cfg.packing
        self.seed = int(data_cfg.seed)
        # The rules that shape the order; a resumed run must plan with the same ones.
        self.rules = {"holdout": data_cfg.get("holdout", "reference"),
                      "mixing": data_cfg.get("mixing", "static"),
                      "negatives_draw": data_cfg.get("negatives_draw", "per_step")}
        self.mixing = self.rules["mixing"]
        self.per_step_negatives = self.rules["negatives_draw"] == "per_step"
        self._data_cfg = data_cfg
        self.num_negatives = []
        for ds in data.datasets:
            want, have = ds.spec.num_negatives, ds.available_negatives
            if want > self.max_negatives:
                raise DataError(f"dataset {ds.name!r} asks for {want} negatives but "
                                f"data.max_negatives={self.max_negatives}")
            if want > have:  # never fewer than asked, silently
                raise DataError(
                    f"dataset {ds.name!r} ({ds.path}) has {have} negative column(s), fewer "
                    f"than the {want} its {ds.spec.task_type} task samples; add "
                    f'"num_negatives": {have} to its manifest entry to train with {have}')
            self.num_negatives.append(want)
        splits = schedule.dataset_splits(data.datasets, data_cfg)
        self.train_rows = [tr for tr, _ in splits]
        self.val_rows = [val for _, val in splits]
        self.G = G = self.packs * B
        self.batches_per_dataset = [math.ceil(len(tr) / G) for tr in self.train_rows]
        self.steps_per_epoch = sum(self.batches_per_dataset)  # as `steps_per_epoch`
        self.train_samples = sum(len(tr) for tr in self.train_rows)
        self.partial_per_epoch = sum(len(tr) % G != 0 for tr in self.train_rows)
        # Datasets smaller than one step's batch: one partial batch per epoch each.
        self.small = {ds.name: len(tr) for ds, tr in zip(data.datasets, self.train_rows)
                      if len(tr) < G}
        self._orders: dict = {}
        self._needs: dict[int, np.ndarray] = {}
        self.planned_epochs = max(1, int(epochs))
        for e in range(self.planned_epochs):
            self.epoch_needs(e)
        # (dataset, batch index in the dataset, rows) of each validation batch.
        self.validation = [(d, j, val[j * G:(j + 1) * G]) for d, val in enumerate(self.val_rows)
                           for j in range(math.ceil(len(val) / G))]
        self.validation_needs = self._validation_needs()
        self.buckets = self._buckets()

    # ---------------------------------------------------------------------- pure order
    def _epoch(self, epoch: int) -> dict:
        if epoch not in self._orders:
            self._orders.clear()  # one epoch at a time keeps memory flat
            order, k = schedule.epoch_order(self.seed, epoch, self.batches_per_dataset,
                                            self.mixing)
            self._orders[epoch] = {"order": order, "k": k, "rows": {}}
        return self._orders[epoch]

    def dataset_order(self, epoch: int, d: int) -> np.ndarray:
        """Dataset d's training rows in epoch `epoch`'s shuffled order."""
        e = self._epoch(epoch)
        if d not in e["rows"]:
            e["rows"][d] = schedule.sample_order(self.seed, epoch, d, self.train_rows[d])
        return e["rows"][d]

    def sample_lengths(self, d: int, epoch: int, rows: np.ndarray, first_batch: int):
        """([n, 2 + negatives] text lengths, [n, 1 + negatives] corpus rows) of dataset d's
        samples `rows`, with the negatives `epoch` draws for them. rows: consecutive batches
        of G of the dataset's epoch order, starting at its batch `first_batch`."""
        ds = self.data.datasets[d]
        batches = None
        if self.per_step_negatives:
            batches = first_batch + np.arange(len(rows)) // self.G
        neg = schedule.choose_negatives(self.seed, epoch, d, rows, ds.available_negatives,
                                        self.num_negatives[d], ds.spec.task_type, batches)
        cols = np.concatenate([np.zeros((len(rows), 1), np.int64), neg], axis=1)
        doc = ds.doc_rows[np.asarray(rows, np.int64)[:, None], cols]
        lens = np.concatenate([ds.q_lengths[rows][:, None], self.data.corpus.lengths[doc]],
                              axis=1)
        return lens, doc

    # ---------------------------------------------------------------------- rows needed
    def _batch_needs(self, d: int, epoch: int, rows: np.ndarray) -> np.ndarray:
        """Rows needed by each batch of G consecutive `rows` of dataset d: [ceil(n / G)]."""
        G = self.G
        n_batches = math.ceil(len(rows) / G)
        if self.mode == "pad_to_longest":
            return np.full(n_batches, self.texts_per_pack, np.int64)
        out = np.zeros(n_batches, np.int64)
        per_chunk = max(1, _CHUNK_PACKS // self.packs)
        for a in range(0, n_batches, per_chunk):
            part = rows[a * G:(a + per_chunk) * G]
            lens, _ = self.sample_lengths(d, epoch, part, a)
            nb = math.ceil(len(part) / G)
            padded = np.zeros((nb * G, lens.shape[1]), np.int64)
            padded[:len(lens)] = lens
            out[a:a + nb] = step_needs(padded.reshape(nb, G, -1), self.packs,
                                       self.samples_per_pack, self.seq_len)
        return out

    def _needs_per_dataset(self, epoch: int, rows: list) -> list[np.ndarray]:
        """_batch_needs of every dataset; NumPy does the work outside the GIL, so the
        datasets are planned side by side on all cores."""
        workers = max(1, min(len(rows), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            return list(ex.map(lambda d: self._batch_needs(d, epoch, rows[d]),
                               range(len(rows))))

    def epoch_needs(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch]: the rows each step of `epoch` needs (cached)."""
        if epoch not in self._needs:
            e = self._epoch(epoch)
            rows = [self.dataset_order(epoch, d) for d in range(len(self.data.datasets))]
            needs = np.zeros(self.steps_per_epoch, np.int64)
            for d, need in enumerate(self._needs_per_dataset(epoch, rows)):
                at = e["order"] == d
                needs[at] = need[e["k"][at]]
            self._needs[epoch] = needs
        return self._needs[epoch]

    def _validation_needs(self) -> np.ndarray:
        out = self._needs_per_dataset(VALIDATION_EPOCH, self.val_rows)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # ---------------------------------------------------------------------- shapes
    @property
    def texts_per_pack(self) -> int:
        return self.samples_per_pack * (2 + self.max_negatives)

    def _buckets(self) -> tuple[int, ...]:
        if self.mode == "pad_to_longest":
            return (self.texts_per_pack,)
        train = np.concatenate([self._needs[e] for e in range(self.planned_epochs)])
        every = np.concatenate([train, self.validation_needs])
        given = row_buckets(self._data_cfg)
        if not given:
            return choose_buckets(every, int(self._data_cfg.get("num_shapes", 3)))
        if len(every) and every.max() > given[-1]:
            self._too_big(given[-1])
        return given

    def _too_big(self, largest: int):
        """Raises DataError naming the first step or batch that needs more than `largest`."""
        for e in sorted(self._needs):
            s = np.flatnonzero(self._needs[e] > largest)
            if len(s):
                d = int(self._epoch(e)["order"][s[0]])
                where = f"epoch {e}, step {int(s[0])}"
                need = int(self._needs[e][s[0]])
                break
        else:
            j = int(np.flatnonzero(self.validation_needs > largest)[0])
            d, where, need = self.validation[j][0], f"validation batch {j}", \
                int(self.validation_needs[j])
        raise DataError(
            f"dataset {self.data.datasets[d].name!r} ({where}) needs {need} rows of "
            f"{self.seq_len} per pack, more than the largest data.rows_per_pack={largest}; "
            "raise it, or set data.rows_per_pack=() to derive the row buckets from the data")

    def bucket(self, need: int) -> int:
        """The smallest row bucket >= need."""
        i = int(np.searchsorted(self.buckets, need))
        if i == len(self.buckets):
            self._too_big(self.buckets[-1])
        return self.buckets[i]

    def geometry(self, rows: int | None = None) -> BatchGeometry:
        """The global batch geometry at `rows` rows per pack (default: the largest bucket)."""
        return geometry_from_config(self._data_cfg, self.packs,
                                    self.buckets[-1] if rows is None else rows)

    @property
    def geometries(self) -> tuple[BatchGeometry, ...]:
        return tuple(self.geometry(r) for r in self.buckets)

    def shapes_used(self) -> dict[str, dict[int, int]]:
        """{"train": {rows: steps over the planned epochs}, "validation": {rows: batches}}."""
        out = {}
        for kind, needs in (("train", [self._needs[e] for e in range(self.planned_epochs)]),
                            ("validation", [self.validation_needs])):
            flat = np.concatenate(needs) if needs else np.zeros(0, np.int64)
            used = np.asarray(self.buckets)[np.searchsorted(self.buckets, flat)]
            rows, counts = np.unique(used, return_counts=True)
            out[kind] = {int(r): int(c) for r, c in zip(rows, counts)}
        return out

    # ---------------------------------------------------------------------- steps
    def _plan(self, step: int, epoch: int, d: int, k: int, rows: np.ndarray,
              need: int) -> StepPlan:
        lens, doc = self.sample_lengths(d, epoch, rows, k)
        return StepPlan(step=step, epoch=epoch, dataset_id=d, rows=rows, doc=doc,
                        lengths=lens,
                        packs=deal(lens.sum(axis=1), self.packs, self.samples_per_pack),
                        rows_per_pack=self.bucket(need), partial=len(rows) < self.G)

    def step(self, step: int) -> StepPlan:
        """The plan of training step `step` (steps count on across epochs)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        e = self._epoch(epoch)
        d, k = int(e["order"][s]), int(e["k"][s])
        rows = self.dataset_order(epoch, d)[k * self.G:(k + 1) * self.G]
        return self._plan(step, epoch, d, k, rows, int(self.epoch_needs(epoch)[s]))

    def validation_step(self, j: int) -> StepPlan:
        d, k, rows = self.validation[j]
        return self._plan(j, VALIDATION_EPOCH, d, k, rows, int(self.validation_needs[j]))

    def describe(self) -> str:
        """One line for the start-up log: shapes, coverage rule outcomes, small datasets."""
        used = self.shapes_used()
        train = ", ".join(f"{r}: {c}" for r, c in used["train"].items())
        line = (f"{self.steps_per_epoch} steps per epoch ({self.partial_per_epoch} partial), "
                f"{self.train_samples} training samples per epoch; row buckets "
                f"{list(self.buckets)} x {self.seq_len} (steps per bucket over "
                f"{self.planned_epochs} epoch(s): {train or 'none'}); "
                + ", ".join(f"data.{k}={v}" for k, v in self.rules.items()))
        if self.small:
            names = ", ".join(f"{n} ({c} rows)" for n, c in sorted(self.small.items()))
            line += (f"; {len(self.small)} dataset(s) smaller than one step's {self.G} samples "
                     f"train as one partial batch per epoch: {names}")
        return line


def steps_per_epoch(data: PreparedData, data_cfg, packs: int) -> int:
    """Steps of one epoch (every dataset's batches of packs x samples_per_pack), without
    planning any shape."""
    G = int(packs) * int(data_cfg.samples_per_pack)
    return sum(math.ceil(len(tr) / G) for tr, _ in schedule.dataset_splits(data.datasets,
                                                                          data_cfg))


def make_data_plan(config, packs: int, data: PreparedData | None = None) -> DataPlan:
    """The run's plan from its config (data.*, and train.epochs / train.max_steps for the
    number of epochs to plan when the config has a train section)."""
    dc = config.data if hasattr(config, "data") else config
    if data is None:
        data = load_prepared(dc.prepared_dir, int(dc.seq_len), dc.manifest,
                             task_types=tuple(dc.get("task_types", ())))
    epochs = 1
    if hasattr(config, "train"):
        epochs = int(config.train.epochs)
        if int(config.train.max_steps) > 0:
            probe = steps_per_epoch(data, dc, packs)
            epochs = math.ceil(int(config.train.max_steps) / max(probe, 1))
    return DataPlan(data, dc, packs, epochs)
