"""The data rules of the reference run (ML-Embed run.py, commit 1c52915), checked against that
code's own lines transcribed here, or against the library it calls: dataset names, the
held-out split, which dataset each step draws, and the hard-negative columns of a step."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import TOKENIZER, data_config, make_inputs
from gcs_helpers import BUCKET as GCS_BUCKET
from train_helpers import ROOT, subprocess_env

from mlembed_jax.config import ConfigError, validate
from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data import schedule
from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.data.plan import make_data_plan
from mlembed_jax.data.prepare import prepare_data
from mlembed_jax.metrics_log import MetricsWriter, flatten, read_metrics

REFERENCE_NAMES = list(manifest_lib.reference_task_types())
ODD_NAMES = ["xcodeeval_code2code_C#", "xcodeeval_code2code_C++", "xcodeeval_nl2code_C#",
             "xcodeeval_nl2code_C++"]


def two_sample_z(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """z of the difference of two frequencies, each from n independent draws (normal
    approximation of two binomials; the variance floored at one count so empty cells pass)."""
    p = (a + b) / 2
    return (a - b) / np.sqrt(np.maximum(p * (1 - p), 1 / n) * 2 / n)


# A cell passes below Z_MAX: two-sided normal tail 6.8e-6 per cell, so at most ~0.1% of runs
# of a 150-cell table fail by chance; a real difference of a few percent is far above it.
Z_MAX = 4.5


# ---------------------------------------------------------------------------- 1: names
def test_all_502_reference_names_pass_the_manifest_check():
    assert len(REFERENCE_NAMES) == 502 and set(ODD_NAMES) <= set(REFERENCE_NAMES)
    specs = manifest_lib.parse_manifest({n: "retrieval" for n in REFERENCE_NAMES})
    assert list(specs) == REFERENCE_NAMES


@pytest.mark.parametrize("name", ["a/b", ".hidden", "a b", "", "tab\tname", "-x", "../up"])
def test_names_that_are_no_safe_file_name_are_still_refused(name):
    with pytest.raises(manifest_lib.ManifestError, match="names may hold letters, digits"):
        manifest_lib.parse_manifest({name: "retrieval"})


def test_make_manifest_over_502_empty_reference_files(tmp_path):
    """The issue's literal check: empty recipe-format files named after every reference
    dataset. make_manifest names all 502, and prepare_data takes the manifest and the file
    names; it stops at the first file only because a dataset with no rows has nothing to
    prepare (one line naming that file), not at any name."""
    raw = tmp_path / "raw"
    raw.mkdir()
    schema = pa.schema([(c, pa.string()) for c in
                        ["query", "passage"] + [f"negative_{j}" for j in range(1, 25)]])
    for name in REFERENCE_NAMES:
        pq.write_table(schema.empty_table(), str(raw / f"{name}.parquet"))
    manifest = tmp_path / "manifest.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_manifest.py"),
                        f"--input_dir={raw}", f"--output={manifest}"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    specs = manifest_lib.load_manifest(str(manifest))
    assert sorted(specs) == sorted(REFERENCE_NAMES)
    manifest_lib.check_files_match(specs, REFERENCE_NAMES, where=str(raw))
    from mlembed_jax.data.parquet_io import DataError

    with pytest.raises(DataError, match=r"\.parquet: the dataset has no rows$"):
        prepare_data(str(raw), str(manifest), TOKENIZER, str(tmp_path / "prep"),
                     max_seq_length=32, workers=1, verbose=False)


@pytest.fixture(scope="module")
def released_502(tmp_path_factory):
    """tools/make_manifest.py over one recipe-format file per reference dataset (query,
    passage, negative_1..24; one row each, since prepare_data refuses an empty dataset),
    then prepare_data with that manifest. Returns (prepared dir, manifest path)."""
    root = tmp_path_factory.mktemp("released502")
    raw = root / "raw"
    raw.mkdir()
    cols = ["query", "passage"] + [f"negative_{j}" for j in range(1, 25)]
    for name in REFERENCE_NAMES:
        pq.write_table(pa.table({c: [f"{name} {c}"] for c in cols}), str(raw / f"{name}.parquet"))
    manifest = root / "manifest.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_manifest.py"),
                        f"--input_dir={raw}", f"--out={manifest}"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "502 datasets" in r.stdout
    out = root / "prep"
    res = prepare_data(str(raw), str(manifest), TOKENIZER, str(out), max_seq_length=32,
                       workers=1, verbose=False)
    assert sorted(res.datasets) == sorted(REFERENCE_NAMES)
    return str(out), str(manifest)


@pytest.mark.integration
def test_make_manifest_over_the_502_reference_files_is_accepted_by_prepare_data(released_502):
    out, manifest = released_502
    m = json.loads(open(manifest).read())
    assert sorted(m) == sorted(REFERENCE_NAMES)
    for name in ODD_NAMES:  # file names too
        assert os.path.exists(os.path.join(out, f"{name}_query.parquet"))
        assert os.path.exists(os.path.join(out, f"{name}.done"))


def read_tensorboard_tags(logdir: str) -> dict[str, float]:
    """tag -> last value of every scalar in the event files (TFRecord framing: length u64,
    its crc u32, the Event proto, its crc u32)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                tags[v.tag] = v.simple_value
    return tags


@pytest.mark.integration
def test_odd_names_train_and_keep_their_names_in_metrics_and_tensorboard(released_502,
                                                                         tmp_path):
    """Every reference dataset trains under its own name, and the per-dataset metric keys of
    metrics.jsonl and the TensorBoard tags are exactly train.py's f"train/loss_by_dataset/
    {name}" and flatten's f"val/dataset_loss/{name}" (tensorboardX's add_scalar would have
    turned C# and C++ into C_ and C__)."""
    out, manifest = released_502
    cfg = data_config(out, manifest=manifest, seq_len=32, max_seq_length=32,
                      samples_per_pack=1, max_negatives=9)
    it = make_train_iterator(cfg, packs=1)
    names = list(it.dataset_names)
    drawn = [next(it)[1]["dataset"] for _ in range(it.steps_per_epoch)]
    assert sorted(drawn) == sorted(REFERENCE_NAMES)  # one row each: one step each

    values = {f"train/loss_by_dataset/{n}": float(i) for i, n in enumerate(ODD_NAMES)}
    values.update(flatten("val/", {"dataset_loss": np.arange(len(names), dtype=float)}, names))
    writer = MetricsWriter(str(tmp_path), start_step=0)
    writer.write(1, values)
    writer.close()
    (row,) = read_metrics(str(tmp_path))
    assert {k: v for k, v in row.items() if k != "step"} == values
    assert read_tensorboard_tags(str(tmp_path / "tensorboard")) == values
    for n in ODD_NAMES:
        assert values[f"val/dataset_loss/{n}"] == names.index(n)


@pytest.mark.integration
@pytest.mark.usefixtures("gcs")
def test_odd_names_as_object_names_on_gcs(tmp_path):
    """The same names as object names: prepare_data from and to gs:// (the local
    fake-gcs-server of gcs_helpers.py, through gcsfs), then loading the prepared data."""
    from mlembed_jax import storage
    from mlembed_jax.data.prepared import load_prepared

    odd = {"x_C#": ("retrieval", 20, 8), "x_C++": ("clustering", 20, 9)}
    raw, mpath, _ = make_inputs(str(tmp_path), datasets=odd)
    base = f"gs://{GCS_BUCKET}/odd_names"
    for f in os.listdir(raw):
        storage.write_bytes_atomic(open(os.path.join(raw, f), "rb").read(), f"{base}/raw/{f}")
    prepare_data(f"{base}/raw", mpath, TOKENIZER, f"{base}/prep", max_seq_length=48,
                 workers=1, verbose=False)
    listed = set(storage.listdir(f"{base}/prep"))
    assert {f"{n}{end}" for n in odd for end in ("_query.parquet", "_docs.parquet",
                                                   ".done")} <= listed
    data = load_prepared(f"{base}/prep", 48, mpath)
    assert list(data.names) == list(odd) and [d.num_rows for d in data.datasets] == [20, 20]


# ---------------------------------------------------------------------------- 4: held out
@pytest.mark.parametrize("n", [2, 3, 57, 99, 100, 101, 199, 200, 1234, 80000])
def test_reference_holdout_is_hf_train_test_split_at_099(n):
    """The reference's dataset.train_test_split(train_size=0.99, shuffle=True, seed=0)
    (run.py:77), run by the datasets library itself: our held-out count equals its test
    split's size, n - floor(0.99 n)."""
    from datasets import Dataset

    hf = Dataset.from_dict({"i": list(range(n))}).train_test_split(
        train_size=0.99, shuffle=True, seed=0)
    train, val = schedule.split_rows(n, "some_dataset", 0, 0.01, 32, min_train=8,
                                     rule="reference")
    assert len(val) == len(hf["test"]) == n - math.floor(0.99 * n)
    assert len(train) == len(hf["train"])
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))


def test_holdout_default_is_the_reference_and_the_floor_stays_an_option():
    class Ds:
        def __init__(self, name, num_rows):
            self.name, self.num_rows = name, num_rows

    sets = [Ds("small", 300), Ds("one", 1), Ds("big", 10_000)]
    cfg = data_config("unused")
    cfg.data.holdout = "reference"
    cfg.data.min_validation_samples = 32
    cfg.data.validation_fraction = 0.01
    # 300 - floor(297) = 3; a one-row dataset (the reference's split raises) trains its row.
    assert [len(v) for _, v in schedule.dataset_splits(sets, cfg.data)] == [3, 0, 100]
    cfg.data.holdout = "floor"
    # max(ceil(1%), 32), at most half the rows and leaving samples_per_pack (4) to train.
    assert [len(v) for _, v in schedule.dataset_splits(sets, cfg.data)] == [32, 0, 100]
    from mlembed_jax.config import base_config
    assert base_config().data.holdout == "reference"


def test_bad_rule_names_are_config_errors():
    from mlembed_jax.config import base_config

    for key in ("holdout", "mixing", "negatives_draw"):
        c = base_config()
        c.data[key] = "nonsense"
        with pytest.raises(ConfigError, match=f"data.{key}='nonsense' must be one of"):
            validate(c)


# ---------------------------------------------------------------------------- 5: mixing
def reference_multiloader(batch_counts: list[int], epoch: int) -> list[tuple[int, int]]:
    """run.py:113-128 (MultiLoader.reset_epoch and __iter__), line for line; each DataLoader
    is a list of its batch indices. Returns (dataset, batch index) per step."""
    loader_dict = {d: list(range(n)) for d, n in enumerate(batch_counts)}
    rng = random.Random(epoch)
    iters = {k: iter(v) for k, v in loader_dict.items()}
    names = list(iters.keys())
    weights = [len(loader_dict[k]) for k in names]
    out = []
    while names:
        name = rng.choices(names, weights=weights)[0]
        try:
            batch = next(iters[name])
            out.append((name, batch))
        except StopIteration:
            idx = names.index(name)
            names.pop(idx)
            weights.pop(idx)
    return out


def position_frequencies(orders: list[np.ndarray], num_datasets: int) -> np.ndarray:
    """[positions, datasets]: how often each dataset is drawn at each step of the epoch."""
    stacked = np.stack(orders)
    return np.stack([(stacked == d).mean(axis=0) for d in range(num_datasets)], axis=1)


def test_static_mixing_matches_the_reference_loop_over_many_seeds():
    """Per-position dataset frequencies of epoch_order's default against the transcribed
    loop, 20,000 epochs each (the reference's random.Random(epoch) per epoch), every one of
    the 4 x 32 cells within Z_MAX; the batches-left rule, run the same way, is not."""
    counts, n = [1, 3, 8, 20], 20_000
    ref = [np.array([d for d, _ in reference_multiloader(counts, e)]) for e in range(n)]
    ours = [schedule.epoch_order(0, e, counts)[0] for e in range(n)]
    left = [schedule.epoch_order(0, e, counts, "batches_left")[0] for e in range(n)]
    f_ref, f_ours, f_left = (position_frequencies(o, 4) for o in (ref, ours, left))
    assert np.abs(two_sample_z(f_ours, f_ref, n)).max() < Z_MAX
    assert np.abs(two_sample_z(f_left, f_ref, n)).max() > 4 * Z_MAX  # the test has power
    # The reference's mark: the 1-batch dataset sits late. Its mean position (0-based) in
    # the reference is well past the middle (15.5) that batches-left gives it.
    mean_pos = lambda orders: np.mean([np.flatnonzero(o == 0)[0] for o in orders])
    assert mean_pos(ref) > 18 and abs(mean_pos(left) - 15.5) < 0.3


def test_static_mixing_sequence_probabilities_by_hand():
    """Two datasets of 1 and 2 batches, weights (1, 2) all epoch. By hand: first draw 0 with
    1/3 -> (0,1,1). First draw 1 (2/3), then 0 with 1/3 -> (1,0,1) = 2/9, else 1 again (the
    0 then comes last) -> (1,1,0) = 4/9. Batches-left gives each 1/3. 30,000 epochs, each
    frequency within Z_MAX standard errors."""
    n = 30_000
    want = {(0, 1, 1): 1 / 3, (1, 0, 1): 2 / 9, (1, 1, 0): 4 / 9}
    got = Counter(tuple(schedule.epoch_order(7, e, [1, 2])[0].tolist()) for e in range(n))
    assert set(got) == set(want)
    for seq, p in want.items():
        assert abs(got[seq] / n - p) < Z_MAX * math.sqrt(p * (1 - p) / n), (seq, got[seq] / n)


def test_mixing_order_is_pure_and_keeps_each_datasets_batches_in_order():
    counts = [5, 1, 12, 3]
    d, k = schedule.epoch_order(3, 2, counts)
    d2, k2 = schedule.epoch_order(3, 2, counts)
    np.testing.assert_array_equal(d, d2)
    np.testing.assert_array_equal(k, k2)
    assert not np.array_equal(d, schedule.epoch_order(3, 3, counts)[0])
    assert not np.array_equal(d, schedule.epoch_order(4, 2, counts)[0])
    for ds, c in enumerate(counts):
        assert k[d == ds].tolist() == list(range(c))


# ---------------------------------------------------------------------------- 7: negatives
def reference_hard_neg_indices(rng: random.Random, num_hard_neg: int) -> list[int]:
    """run.py:45-47, once per batch (collate_fn; the global random, seeded by set_seed(0) at
    run.py:62): 0-based columns, shared by the batch."""
    hard_neg_indices = [0] if num_hard_neg == 1 else rng.sample(list(range(24)), num_hard_neg)
    return hard_neg_indices


def test_shared_negative_columns_match_the_reference_draw():
    """Per step, our default's columns (1-based) against the reference's random.sample over
    20,000 steps: every sample of a step has the same columns, and the frequency of each
    column at each of the 7 slots (24 x 7 cells) and of each unordered pair of columns in one
    draw (276 cells, the joint) are within Z_MAX."""
    steps, G, k = 20_000, 4, 7
    rng = random.Random(0)  # run.py's set_seed(0)
    ref = np.array([reference_hard_neg_indices(rng, k) for _ in range(steps)]) + 1
    rows = np.arange(steps * G)
    cols = schedule.choose_negatives(0, 0, 5, rows, 24, k, "retrieval",
                                     batches=rows // G)
    per_step = cols.reshape(steps, G, k)
    assert (per_step == per_step[:, :1]).all()  # shared by the step's samples
    ours = per_step[:, 0]
    assert all(len(set(c)) == k for c in ours.tolist())

    def slot_freq(c):
        return np.stack([(c == j).mean(axis=0) for j in range(1, 25)])

    def pair_freq(c):
        hot = np.zeros((len(c), 25), bool)
        np.put_along_axis(hot, c, True, axis=1)
        hot = hot[:, 1:].astype(np.float64)
        return (hot.T @ hot / len(c))[np.triu_indices(24, 1)]

    assert np.abs(two_sample_z(slot_freq(ours), slot_freq(ref), steps)).max() < Z_MAX
    assert np.abs(two_sample_z(pair_freq(ours), pair_freq(ref), steps)).max() < Z_MAX
    # 7 of 24 per draw: each pair in a draw with probability 7*6 / (24*23).
    assert abs(pair_freq(ref).mean() - 42 / 552) < 1e-12
    # Classification: the reference's [0], i.e. negative_1, for every sample.
    assert reference_hard_neg_indices(rng, 1) == [0]
    cls = schedule.choose_negatives(0, 0, 5, rows[:8], 24, 1, "classification", rows[:8] // G)
    assert (cls == 1).all()


def test_per_sample_draw_stays_an_option():
    rows = np.arange(4000)
    shared = schedule.choose_negatives(1, 0, 2, rows, 24, 7, "retrieval", rows // 4)
    own = schedule.choose_negatives(1, 0, 2, rows, 24, 7, "retrieval")
    assert (shared.reshape(-1, 4, 7) == shared.reshape(-1, 4, 7)[:, :1]).all()
    differ = (own.reshape(-1, 4, 7) != own.reshape(-1, 4, 7)[:, :1]).any(axis=(1, 2))
    assert differ.mean() > 0.99  # 4 independent draws of 7 of 24 almost never agree
    # Same marginal: each column about 7/24 of the time in both (4,000 draws: 5 sigma 0.036).
    for c in (shared, own):
        freq = np.array([(c == j).any(axis=1).mean() for j in range(1, 25)])
        assert np.abs(freq - 7 / 24).max() < 0.036


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rules"))
    raw, mpath, rows = make_inputs(root)
    out = os.path.join(root, "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    return out


def step_columns(plan, s: int) -> np.ndarray:
    """[samples, negatives]: the negative columns (1-based) of training step s, read back
    from the planned corpus rows."""
    st = plan.step(s)
    ds = plan.data.datasets[st.dataset_id]
    out = []
    for i, r in enumerate(st.rows):
        table = ds.doc_rows[r]
        out.append([int(np.flatnonzero(table == doc)[0]) for doc in st.doc[i, 1:]])
    return np.array(out)


@pytest.mark.parametrize("draw", ["per_step", "per_sample"])
def test_planned_steps_follow_the_draw_and_replan_identically(small_prepared, draw):
    """Through the data plan: the retrieval steps' samples (7 of 10 columns) share their
    negative columns (per_step) or not (per_sample); a plan built afresh (a resumed run)
    plans the same columns and datasets."""
    cfg = data_config(small_prepared, negatives_draw=draw)
    plan, again = make_data_plan(cfg, 2), make_data_plan(cfg, 2)
    shared = []
    for s in range(plan.steps_per_epoch):
        st = plan.step(s)
        if plan.data.datasets[st.dataset_id].spec.task_type != "retrieval":
            continue
        cols = step_columns(plan, s)
        np.testing.assert_array_equal(cols, step_columns(again, s))
        shared.append(bool((cols == cols[:1]).all()) if len(cols) > 1 else None)
    shared = [x for x in shared if x is not None]
    assert shared and all(shared) if draw == "per_step" else not any(shared)
    assert [plan.step(s).dataset_id for s in range(plan.steps_per_epoch)] == \
        [again.step(s).dataset_id for s in range(plan.steps_per_epoch)]
    assert f"data.holdout=floor, data.mixing=static, data.negatives_draw={draw}" in \
        plan.describe()

