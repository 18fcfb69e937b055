"""The packed pipeline: slots, decoding, determinism, exact resume, process shares."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import SMALL, TOKENIZER, data_config, make_inputs

from mlembed_jax.batch import check_batch
from mlembed_jax.data.pipeline import make_train_iterator, make_validation_iterator
from mlembed_jax.data.prepare import prepare_data
from mlembed_jax.data.prepared import load_prepared
from mlembed_jax.data.schedule import split_rows
from mlembed_jax.data.text_encoding import load_tokenizer

EOS = 1
NEGS = {"retrieval": 7, "clustering": 9, "classification": 1}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipe"))
    raw, mpath, rows = make_inputs(root)
    out = os.path.join(root, "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    return out, rows


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def decode_texts(batch, geometry, tok):
    """Per pack, per text slot: the decoded text (None if empty). Checks the row layout:
    each text is one contiguous segment, positions restart at 0, EOS is its last token."""
    S, R = geometry.seq_len, geometry.rows_per_pack
    out = []
    for p in range(geometry.packs):
        texts = [None] * geometry.texts_per_pack
        for t in np.flatnonzero(batch["text_valid"][p]):
            r, end = divmod(int(batch["pool_index"][p, t]), S)
            row = p * R + r
            seg = batch["segment_ids"][row, end]
            cols = np.flatnonzero(batch["segment_ids"][row] == seg)
            assert seg > 0 and cols[-1] == end and np.all(np.diff(cols) == 1)
            assert batch["positions"][row, cols].tolist() == list(range(len(cols)))
            ids = batch["tokens"][row, cols]
            assert ids[-1] == EOS and EOS not in ids[:-1]
            texts[t] = tok.decode(ids[:-1].tolist())
        # Segment ids of every row are 1..k in column order, padding (0) after.
        for r in range(R):
            seg = batch["segment_ids"][p * R + r]
            k = seg.max()
            real = seg[seg > 0]
            assert np.all(np.diff(real) >= 0) and set(real.tolist()) == set(range(1, k + 1))
            assert np.all(batch["tokens"][p * R + r][seg == 0] == 0)
        out.append(texts)
    return out


def check_samples(batch, geometry, tok, rows, names, datasets=SMALL):
    """Every valid sample slot holds its own query, positive and negatives. Returns the
    (dataset, sample index) pairs seen."""
    texts = decode_texts(batch, geometry, tok)
    seen = []
    for p in range(geometry.packs):
        for b in np.flatnonzero(batch["sample_valid"][p]):
            q = texts[p][batch["query_text"][p, b]]
            m = re.match(r"(\w+) query (\d+)", q)
            name, i = m.group(1), int(m.group(2))
            row = rows[name][i]
            task = datasets[name][0]
            assert q == row["query"]
            assert names[batch["dataset_id"][p, b]] == name
            assert bool(batch["in_batch"][p, b]) == (task == "retrieval")
            assert texts[p][batch["positive_text"][p, b]] == row["passage"]
            nv = batch["negative_valid"][p, b]
            assert nv.sum() == NEGS[task] and nv[:NEGS[task]].all()
            negs = [texts[p][t] for t in batch["negative_text"][p, b][nv]]
            allowed = {v for k, v in row.items() if k.startswith("negative_")}
            assert set(negs) <= allowed and len(set(negs)) == len(negs)
            seen.append((name, i))
    # Invalid slots and text slots beyond the samples stay empty.
    assert not batch["negative_valid"][~batch["sample_valid"]].any()
    return seen


@pytest.mark.parametrize("packs", [1, 2, 4])
def test_every_epoch_trains_every_sample_once_at_the_configured_batch(prepared, tok, packs):
    out, rows = prepared
    cfg = data_config(out)
    with cfg.unlocked():
        cfg.train.epochs = 2
    it = make_train_iterator(cfg, packs=packs)
    plan = it.plan
    B = plan.samples_per_pack
    assert (B, plan.texts_per_pack) == (4, 44)
    assert 1 <= len(plan.buckets) <= 3
    names = it.dataset_names
    data = load_prepared(out, 64)
    for epoch in range(2):
        seen, datasets, shapes, partial = [], set(), set(), 0
        for _ in range(it.steps_per_epoch):
            batch, stats = next(it)
            assert stats["epoch"] == epoch and stats["rows"] in plan.buckets
            g = plan.geometry(stats["rows"])
            check_batch(batch, g)
            got = check_samples(batch, g, tok, rows, names)
            assert {n for n, _ in got} <= {stats["dataset"]}  # one dataset per step
            assert stats["samples"] == stats["step_samples"] == len(got)
            per_pack = batch["sample_valid"].sum(axis=1)
            if stats["partial"]:
                partial += 1
                assert len(got) < packs * B
            else:  # a full step: exactly B samples in every pack
                assert per_pack.tolist() == [B] * packs
            assert 0 < stats["padding_fraction"] < 1
            datasets.add(stats["dataset"])
            shapes.add(stats["rows"])
            seen += got
        assert datasets == set(SMALL)
        # Each training row exactly once per epoch, no held-out row ever.
        for ds in data.datasets:
            train, val = split_rows(ds.num_rows, ds.name, 0, 0.1, 8, rule="floor")
            got = sorted(i for n, i in seen if n == ds.name)
            assert got == train.tolist()
            assert len(val) == max(8, int(np.ceil(0.1 * ds.num_rows)))
        end = stats["epoch_end"]
        assert (end["epoch"], end["samples"], end["coverage"]) == (epoch, len(seen), 1.0)
        assert end["partial_batches"] == partial == sum(
            len(split_rows(ds.num_rows, ds.name, 0, 0.1, 8, rule="floor")[0]) % (packs * B)
            > 0 for ds in data.datasets)
        assert set(end["steps_by_rows"]) == shapes and sum(end["steps_by_rows"].values()) == \
            it.steps_per_epoch


def _run(out, steps, **cfg):
    it = make_train_iterator(data_config(out, **cfg), packs=2)
    return [next(it) for _ in range(steps)]


def test_same_seed_same_batches_other_seed_differs(prepared):
    out, _ = prepared
    a, b = _run(out, 6), _run(out, 6, prefetch=3)  # prefetching changes nothing
    c = _run(out, 6, seed=1)
    for (x, sx), (y, sy) in zip(a, b):
        assert sx == sy and all(np.array_equal(x[k], y[k]) for k in x)
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for (x, _), (z, _) in zip(a, c))


RESUME_SCRIPT = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
from data_helpers import data_config
from mlembed_jax.data.pipeline import make_train_iterator
it = make_train_iterator(data_config(sys.argv[2], prefetch=2), packs=2)
it.set_state(json.load(open(sys.argv[3])))
for i in range(4):
    batch, stats = next(it)
    np.savez(f"{sys.argv[4]}{i}.npz", **batch)
    json.dump(stats, open(f"{sys.argv[4]}{i}.json", "w"))
"""


@pytest.mark.integration
@pytest.mark.parametrize("where", ["mid", "epoch_end"])
def test_resume_in_fresh_process(prepared, tmp_path, where):
    """The next batches after a restored state, in a fresh process, are exactly the
    uninterrupted run's, mid-epoch and across an epoch's end, with several shapes in play."""
    out, _ = prepared
    it = make_train_iterator(data_config(out, prefetch=2), packs=2)
    spe = it.steps_per_epoch
    k = 5 if where == "mid" else spe - 2
    for _ in range(k):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    assert len({s["rows"] for _, s in want}) >= 2, "the test should cross row buckets"
    if where == "epoch_end":
        assert "epoch_end" in want[1][1] and want[2][1]["epoch"] == 1
    spath = tmp_path / "state.json"
    spath.write_text(json.dumps(state))  # JSON round trip, as in the checkpoint
    res = str(tmp_path / "next")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, os.path.dirname(__file__), out,
                    str(spath), res], check=True, env=env, timeout=120)
    for i, (batch, stats) in enumerate(want):
        assert json.load(open(f"{res}{i}.json")) == json.loads(json.dumps(stats))
        got = np.load(f"{res}{i}.npz")
        for key, arr in batch.items():
            np.testing.assert_array_equal(got[key], arr, err_msg=key)


def test_old_carry_over_state_is_refused_with_the_way_out(prepared):
    from mlembed_jax.data.parquet_io import DataError

    out, _ = prepared
    it = make_train_iterator(data_config(out), packs=2)
    old = {"version": 1, "step": 10, "seed": 0, "packs": 2, "pack_range": [0, 2],
           "datasets": ["ret", "clu", "cls"], "carry": {"ret": {"0": [3, 4]}},
           "totals": {"samples": 1, "real_tokens": 1, "cells": 1, "carried_over": 2}}
    with pytest.raises(DataError, match="version 1.*init_from=<the old workdir>"):
        it.set_state(old)


def test_state_from_before_the_reference_rules_resumes_only_with_the_old_rules(prepared):
    """A checkpoint's iterator state without "rules" was planned by the only rules there
    were (floor, batches_left, per_sample); resuming it with other rules would change its
    epoch's order, so it is refused with the flags that continue it exactly."""
    from mlembed_jax.data.parquet_io import DataError

    out, _ = prepared
    old_rules = {"holdout": "floor", "mixing": "batches_left", "negatives_draw": "per_sample"}
    state = make_train_iterator(data_config(out, **old_rules), packs=2).get_state()
    del state["rules"]
    it = make_train_iterator(data_config(out, mixing="static", negatives_draw="per_step"),
                             packs=2)
    with pytest.raises(DataError, match=r"data.mixing='batches_left', here 'static', "
                       r"data.negatives_draw='per_sample', here 'per_step'\); resume with "
                       r"--config.data.mixing=batches_left --config.data.negatives_draw="
                       r"per_sample to continue"):
        it.set_state(state)
    again = make_train_iterator(data_config(out, **old_rules), packs=2)
    again.set_state(state)
    assert again.get_state()["rules"] == old_rules


def _queries(batch, geometry):
    """Token tuples of every valid sample's query: the sample's identity."""
    S, R = geometry.seq_len, geometry.rows_per_pack
    out = []
    for p in range(geometry.packs):
        for b in np.flatnonzero(batch["sample_valid"][p]):
            r, end = divmod(int(batch["pool_index"][p, batch["query_text"][p, b]]), S)
            row = p * R + r
            seg = batch["segment_ids"][row] == batch["segment_ids"][row, end]
            out.append(tuple(batch["tokens"][row][seg].tolist()))
    return out


def test_two_processes_get_disjoint_shares_of_the_same_steps(prepared):
    """Each process builds only its packs; together they are the one-process batch."""
    out, _ = prepared
    cfg = data_config(out)
    whole = make_train_iterator(cfg, packs=4)
    parts = [make_train_iterator(cfg, packs=4, pack_range=(2 * i, 2 * i + 2)) for i in range(2)]
    assert parts[1].inner.pack_start == 2 and parts[1].geometry.packs == 2
    assert parts[0].plan.buckets == whole.plan.buckets
    for _ in range(whole.steps_per_epoch + 3):
        w, ws = next(whole)
        (a, sa), (b, sb) = next(parts[0]), next(parts[1])
        assert sa["dataset"] == sb["dataset"] == ws["dataset"]
        assert sa["rows"] == sb["rows"] == ws["rows"]  # every process the same shape
        assert sa["samples"] + sb["samples"] == ws["samples"]
        half = dataclasses.replace(whole.plan.geometry(ws["rows"]), packs=2)
        qa, qb = _queries(a, half), _queries(b, half)
        assert not set(qa) & set(qb)
        assert sorted(qa + qb) == sorted(_queries(w, whole.plan.geometry(ws["rows"])))
        for key in w:
            half = w[key].shape[0] // 2
            np.testing.assert_array_equal(a[key], w[key][:half])
            np.testing.assert_array_equal(b[key], w[key][half:])


def test_validation_batches_fixed_and_cover_held_out(prepared, tok):
    out, rows = prepared
    cfg = data_config(out)
    val = make_validation_iterator(cfg, packs=2)
    first = list(val)
    again = list(make_validation_iterator(cfg, packs=2))
    assert len(first) == len(val) == len(again) > 0
    seen = []
    for (x, sx), (y, sy) in zip(first, again):
        assert sx == sy and all(np.array_equal(x[k], y[k]) for k in x)
        assert sx["rows"] in val.plan.buckets
        seen += check_samples(x, val.plan.geometry(sx["rows"]), tok, rows, ("ret", "clu", "cls"))
    data = load_prepared(out, 64)
    want = sorted((ds.name, int(i)) for ds in data.datasets
                  for i in split_rows(ds.num_rows, ds.name, 0, 0.1, 8, rule="floor")[1])
    assert sorted(seen) == want


def test_pad_to_longest_mode_one_text_per_row(prepared, tok):
    out, rows = prepared
    it = make_train_iterator(data_config(out, packing="pad_to_longest"), packs=2)
    g = it.global_geometry
    assert g.rows_per_pack == g.texts_per_pack == 4 * 11
    batch, stats = next(it)
    assert it.plan.buckets == (44,) and stats["rows"] == 44
    check_batch(batch, g)
    check_samples(batch, g, tok, rows, it.dataset_names)
    assert batch["segment_ids"].max() == 1  # never two texts in a row
    assert stats["padding_fraction"] > 0.5


def test_set_state_rejects_another_layout(prepared):
    out, _ = prepared
    a = make_train_iterator(data_config(out), packs=2)
    b = make_train_iterator(data_config(out), packs=4)
    with pytest.raises(ValueError, match="packs"):
        b.set_state(a.get_state())


def test_global_batch_over_8_devices(prepared):
    import jax

    from mlembed_jax.sharding import packs_per_step, process_pack_range, to_global_batch

    out, _ = prepared
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
    cfg = data_config(out)
    rules = cfg.mesh.logical_axis_rules
    P = packs_per_step(cfg.data, mesh, rules)
    assert P == 8 and process_pack_range(mesh, rules, P) == (0, 8)
    it = make_train_iterator(cfg, packs=P, pack_range=process_pack_range(mesh, rules, P))
    batch, stats = next(it)
    g = to_global_batch(batch, it.plan.geometry(stats["rows"]), mesh, rules)
    for key, arr in g.items():
        assert arr.shape == batch[key].shape
        np.testing.assert_array_equal(np.asarray(arr), batch[key])
        shard_rows = {s.data.shape[0] for s in arr.addressable_shards}
        assert shard_rows == {batch[key].shape[0] // 8}  # one pack per device


def test_tiny_datasets_train_as_partial_batches(tmp_path, tok):
    """The issue's case: an 11-row set used to keep 6 training rows after the held-out floor,
    fewer than a batch, and stop the run with a traceback. Now the split leaves it at least
    one pack's batch and a dataset smaller than a step trains as one partial batch."""
    tiny = {"big": ("retrieval", 60, 8), "eleven": ("retrieval", 11, 8),
            "three": ("clustering", 3, 9)}
    raw, mpath, rows = make_inputs(str(tmp_path), datasets=tiny)
    out = str(tmp_path / "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    it = make_train_iterator(data_config(out), packs=4)  # G = 4 packs x 4 = 16 samples
    plan = it.plan
    # eleven: ceil(10% of 11) = 2, raised to the floor 8, capped at half (5), then at
    # 11 - 4 (one pack's batch left): 5 held out, 6 trained. three: nothing held out.
    assert {n: len(t) for n, t in zip(it.dataset_names, plan.train_rows)} == {
        "big": 52, "eleven": 6, "three": 3}
    assert plan.small == {"eleven": 6, "three": 3}
    assert "train as one partial batch per epoch: eleven (6 rows), three (3 rows)" in \
        plan.describe()
    seen, partial = [], {}
    for _ in range(it.steps_per_epoch):
        batch, stats = next(it)
        seen += check_samples(batch, plan.geometry(stats["rows"]), tok, rows, it.dataset_names,
                              tiny)
        partial[stats["dataset"]] = partial.get(stats["dataset"], 0) + stats["partial"]
    assert partial == {"big": 1, "eleven": 1, "three": 1}  # 52 = 3 x 16 + 4
    assert sorted(i for n, i in seen if n == "three") == [0, 1, 2]
    assert len([i for n, i in seen if n == "eleven"]) == 6
    assert stats["epoch_end"]["coverage"] == 1.0


def test_classification_always_takes_negative_1(tmp_path, tok):
    raw, mpath, rows = make_inputs(str(tmp_path), datasets={"cls3": ("classification", 40, 3)})
    out = str(tmp_path / "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    it = make_train_iterator(data_config(out), packs=2)
    for _ in range(it.steps_per_epoch):
        batch, stats = next(it)
        texts = decode_texts(batch, it.plan.geometry(stats["rows"]), tok)
        for p in range(2):
            for b in np.flatnonzero(batch["sample_valid"][p]):
                i = int(re.match(r"cls3 query (\d+)", texts[p][batch["query_text"][p, b]])[1])
                (neg,) = [texts[p][t] for t in batch["negative_text"][p, b]
                          [batch["negative_valid"][p, b]]]
                assert neg == rows["cls3"][i]["negative_1"]
