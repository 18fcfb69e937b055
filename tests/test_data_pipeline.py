"""The packed pipeline: slots, decoding, determinism, exact resume, process shares."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_data_helpers import SMALL, TOKENIZER, data_config, make_inputs

from mlembed_jax.batch import check_batch
from mlembed_jax.data.pipeline import make_train_iterator, make_validation_iterator
from mlembed_jax.data.prepare import prepare_data
from mlembed_jax.data.prepared import load_prepared
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


def check_samples(batch, geometry, tok, rows, names):
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
            task = SMALL[name][0]
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


def test_one_epoch_every_sample_in_its_slots(prepared, tok):
    out, rows = prepared
    it = make_train_iterator(data_config(out), packs=2)
    g = it.geometry
    assert (g.samples_per_pack, g.texts_per_pack) == (6, 66)
    names = it.dataset_names
    seen = []
    datasets = set()
    for _ in range(it.steps_per_epoch):
        batch, stats = next(it)
        check_batch(batch, g)
        got = check_samples(batch, g, tok, rows, names)
        assert {n for n, _ in got} <= {stats["dataset"]}  # one dataset per step
        assert stats["samples"] == len(got)
        assert 0 < stats["padding_fraction"] < 1
        datasets.add(stats["dataset"])
        seen += got
    assert datasets == set(SMALL)
    assert stats["carry_backlog"] == 0 and it.inner.totals["carried_over"] == 0
    # Each training row exactly once per epoch, no held-out row ever.
    data = load_prepared(out, 64)
    from mlembed_jax.data.schedule import split_rows

    for ds in data.datasets:
        train, val = split_rows(ds.num_rows, ds.name, 0, 0.1, 8)
        got = sorted(i for n, i in seen if n == ds.name)
        assert got == train.tolist()
        assert len(val) == max(8, int(np.ceil(0.1 * ds.num_rows)))


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
from test_data_helpers import data_config
from mlembed_jax.data.pipeline import make_train_iterator
cfg = json.loads(sys.argv[3])
it = make_train_iterator(data_config(sys.argv[2], **cfg), packs=2)
it.set_state(json.load(open(sys.argv[4])))
batch, stats = next(it)
np.savez(sys.argv[5], **batch)
json.dump(stats, open(sys.argv[5] + ".json", "w"))
"""


@pytest.mark.parametrize("k", [3, 7])
def test_resume_in_fresh_process(prepared, tmp_path, k):
    """Tight rows force carry-over, so the restored state must carry it exactly."""
    out, _ = prepared
    cfg = {"rows_per_pack": 14, "prefetch": 2}
    it = make_train_iterator(data_config(out, **cfg), packs=2)
    for _ in range(k):
        next(it)
    state = it.get_state()
    want, want_stats = next(it)
    assert state["carry"], "the test should exercise carried-over samples"
    spath = tmp_path / "state.json"
    spath.write_text(json.dumps(state))  # JSON round trip, as in the checkpoint
    res = str(tmp_path / "next.npz")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, os.path.dirname(__file__), out,
                    json.dumps(cfg), str(spath), res], check=True, env=env, timeout=120)
    got = np.load(res)
    assert json.load(open(res + ".json")) == want_stats
    for key, arr in want.items():
        np.testing.assert_array_equal(got[key], arr, err_msg=key)


def test_carry_over_loses_no_sample(prepared, tok):
    out, rows = prepared
    it = make_train_iterator(data_config(out, rows_per_pack=19), packs=2)
    seen = []
    deferred = 0
    for _ in range(3 * it.steps_per_epoch):
        batch, stats = next(it)
        seen += check_samples(batch, it.geometry, tok, rows, it.dataset_names)
        deferred += stats["carried_over"]
    assert deferred > 0
    waiting = sum(len(v) for c in it.get_state()["carry"].values() for v in c.values())
    total_train = sum(len(v) for v in rows.values()) - (16 + 12 + 10)
    assert len(seen) + waiting == 3 * total_train
    assert waiting <= 24  # the backlog stays small: the spare slots drain it


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
    cfg = data_config(out, rows_per_pack=19)  # tight enough that packs carry samples over
    whole = make_train_iterator(cfg, packs=4)
    parts = [make_train_iterator(cfg, packs=4, pack_range=(2 * i, 2 * i + 2)) for i in range(2)]
    assert parts[1].inner.pack_start == 2 and parts[1].geometry.packs == 2
    for _ in range(whole.steps_per_epoch + 3):
        w, ws = next(whole)
        (a, sa), (b, sb) = next(parts[0]), next(parts[1])
        assert sa["dataset"] == sb["dataset"] == ws["dataset"]
        assert sa["samples"] + sb["samples"] == ws["samples"]
        qa, qb = _queries(a, parts[0].geometry), _queries(b, parts[1].geometry)
        assert not set(qa) & set(qb)
        assert sorted(qa + qb) == sorted(_queries(w, whole.geometry))
        for key in w:
            half = w[key].shape[0] // 2
            np.testing.assert_array_equal(a[key], w[key][:half])
            np.testing.assert_array_equal(b[key], w[key][half:])


def test_validation_batches_fixed_and_cover_held_out(prepared, tok):
    out, rows = prepared
    cfg = data_config(out, rows_per_pack=17)
    val = make_validation_iterator(cfg, packs=2)
    first = list(val)
    again = list(make_validation_iterator(cfg, packs=2))
    assert len(first) == len(val) == len(again) > 0
    seen = []
    for (x, sx), (y, sy) in zip(first, again):
        assert sx == sy and all(np.array_equal(x[k], y[k]) for k in x)
        seen += check_samples(x, val.geometry, tok, rows, ("ret", "clu", "cls"))
    from mlembed_jax.data.schedule import split_rows

    data = load_prepared(out, 64)
    want = sorted((ds.name, int(i)) for ds in data.datasets
                  for i in split_rows(ds.num_rows, ds.name, 0, 0.1, 8)[1])
    assert sorted(seen) == want


def test_pad_to_longest_mode_one_text_per_row(prepared, tok):
    out, rows = prepared
    it = make_train_iterator(data_config(out, packing="pad_to_longest"), packs=2)
    g = it.geometry
    assert g.rows_per_pack == g.texts_per_pack == 4 * 11
    batch, stats = next(it)
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
    batch, _ = next(it)
    g = to_global_batch(batch, it.global_geometry, mesh, rules)
    for key, arr in g.items():
        assert arr.shape == batch[key].shape
        np.testing.assert_array_equal(np.asarray(arr), batch[key])
        shard_rows = {s.data.shape[0] for s in arr.addressable_shards}
        assert shard_rows == {batch[key].shape[0] // 8}  # one pack per device
