"""prepare_data: tokenisation parity with HF, outputs, rerun skipping, and every bad input."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import SMALL, TOKENIZER, data_config, make_inputs

from mlembed_jax.data import DEMO_MANIFEST, DEMO_PREPARED
from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data.parquet_io import DataError
from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.data.prepare import TokenizerPool, prepare_data
from mlembed_jax.data.prepared import load_prepared
from mlembed_jax.data.text_encoding import TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def test_demo_tokenizer_ids_match_plain_hf_call(tokenizer):
    """tokenizer(text, truncation, max_length) == prepare's ids, truncated text included."""
    assert tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert len(tokenizer) <= 4096
    texts = ["Deutschland", "Германия ドイツ", "  leading spaces and 東京 ",
             "long " + "Zürich Москва " * 200]
    L = 32
    enc = TokenizerPool(tokenizer, L, workers=1)
    ours = enc.encode(texts, "t")
    for text, ids in zip(texts, ours):
        hf = tokenizer(text, truncation=True, max_length=L)["input_ids"]
        assert ids.tolist() == hf
        assert ids[-1] == 1 and len(ids) <= L
    assert len(ours[-1]) == L  # the long text really was truncated
    # The process pool (all cores) gives the same ids as in-process encoding.
    pool = TokenizerPool(tokenizer, L, workers=2)
    try:
        assert [a.tolist() for a in pool.encode(texts, "t")] == [a.tolist() for a in ours]
    finally:
        pool.close()


def test_truncate_then_eos_is_one_rule_whatever_the_tokenizer_is_set_to():
    """The cut is ours, not the tokenizer's: a tokenizer set to truncate from the left still
    keeps each text's first max_seq_length - 1 ids, then EOS (ids by hand below)."""
    from mlembed_jax.data.text_encoding import encode_texts, truncate_then_eos

    got = truncate_then_eos([[5, 6, 7], [], [9]], 3, eos=1)
    assert [a.tolist() for a in got] == [[5, 6, 1], [1], [9, 1]]
    assert all(a.dtype == "int32" for a in got)
    left = load_tokenizer(TOKENIZER)
    left.truncation_side = "left"
    text = "Zürich Москва " * 50
    full = left(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(full) > 15
    want = full[:15] + [1]
    assert encode_texts(left, [text], 16)[0].tolist() == want
    assert TokenizerPool(left, 16, workers=1).encode([text], "t")[0].tolist() == want


def test_prepare_writes_outputs_dedups_and_skips_on_rerun(tmp_path, capsys):
    raw, mpath, rows = make_inputs(str(tmp_path))
    out = str(tmp_path / "prep")
    res = prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1)
    summary = capsys.readouterr().out
    for name in SMALL:
        assert name in summary
        assert os.path.exists(os.path.join(out, f"{name}_query.parquet"))
        assert os.path.exists(os.path.join(out, f"{name}.done"))
    assert res.skipped == []
    corpus = pq.read_table(os.path.join(out, "corpus.parquet"))
    assert corpus.column_names == ["doc_id", "input_ids"]
    # Unique docs: every passage/negative text once; the shared passage counted once overall.
    texts = {v for n in rows for r in rows[n] for k, v in r.items() if k != "query"}
    assert corpus.num_rows == len(texts)
    q = pq.read_table(os.path.join(out, "ret_query.parquet"))
    assert q.num_rows == SMALL["ret"][1]
    assert q.column_names == ["query_input_ids", "passage"] + [f"negative_{i}"
                                                               for i in range(1, 11)]
    info = json.load(open(os.path.join(out, "prepared.json")))
    assert info["eos_token_id"] == 1 and set(info["datasets"]) == set(SMALL)
    assert info["datasets"]["ret"]["samples"] == SMALL["ret"][1]

    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    res2 = prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1,
                        verbose=False)
    assert sorted(res2.skipped) == sorted(SMALL)
    assert mtimes == {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    # A half-finished dataset (marker gone, as after a kill) is redone, others skipped.
    os.remove(os.path.join(out, "clu.done"))
    res3 = prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1,
                        verbose=False)
    assert sorted(res3.skipped) == ["cls", "ret"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_shipped_demo_data_loads():
    specs = manifest_lib.load_manifest(DEMO_MANIFEST)
    assert [s.task_type for s in specs.values()] == ["retrieval", "clustering",
                                                     "classification"]
    data = load_prepared(DEMO_PREPARED, 64, DEMO_MANIFEST)
    assert sum(d.num_rows for d in data.datasets) > 2000
    assert data.info["eos_token_id"] == 1


def test_manifest_defaults_and_errors(tmp_path):
    specs = manifest_lib.parse_manifest({"a": "retrieval", "b": {"task_type": "clustering"},
                                         "c": {"task_type": "classification",
                                               "num_negatives": 1, "query_prefix": "q: "}})
    assert [s.num_negatives for s in specs.values()] == [7, 9, 1]
    assert [s.in_batch for s in specs.values()] == [True, False, False]
    with pytest.raises(manifest_lib.ManifestError, match="task_type='ranking'"):
        manifest_lib.parse_manifest({"a": {"task_type": "ranking"}})
    raw, mpath, _ = make_inputs(str(tmp_path), manifest_extra=None)
    pq.write_table(pa.table({"query": ["x"], "passage": ["y"], "negative_1": ["z"]}),
                   os.path.join(raw, "stray.parquet"))
    with pytest.raises(manifest_lib.ManifestError, match="stray"):
        prepare_data(raw, mpath, TOKENIZER, str(tmp_path / "p"), workers=1)


# ---------------------------------------------------------------------------- bad inputs
def _one_dataset(tmp_path, table: pa.Table):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(table, raw / "bad.parquet")
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps({"bad": {"task_type": "retrieval"}}))
    return str(raw), str(mpath)


def _prep(tmp_path, table):
    raw, mpath = _one_dataset(tmp_path, table)
    return prepare_data(raw, mpath, TOKENIZER, str(tmp_path / "out"), workers=1, verbose=False)


GOOD = {"query": ["q0", "q1", "q2"], "passage": ["p0", "p1", "p2"],
        "negative_1": ["n0", "n1", "n2"]}


@pytest.mark.parametrize("change, pattern", [
    ({"passage": None}, r"bad.parquet: missing column 'passage'"),
    ({"negative_1": None}, r"bad.parquet: missing column 'negative_1'"),
    ({"query": ["q0", None, "q2"]}, r"bad.parquet: row 1, column 'query': null text"),
    ({"passage": ["p0", "p1", "   "]}, r"bad.parquet: row 2, column 'passage': empty text"),
    ({"negative_1": [None, 7, 8]}, r"bad.parquet: row 1, column 'negative_1': expected a "
                                   r"string, got int64 value 7"),
])
def test_bad_cells_name_file_row_column(tmp_path, change, pattern):
    cols = dict(GOOD)
    for k, v in change.items():
        if v is None:
            del cols[k]
        else:
            cols[k] = v
    with pytest.raises(DataError, match=pattern):
        _prep(tmp_path, pa.table(cols))


def test_negative_columns_must_be_contiguous(tmp_path):
    cols = dict(GOOD, negative_3=["a", "b", "c"])
    with pytest.raises(DataError, match="missing column 'negative_2'"):
        _prep(tmp_path, pa.table(cols))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_or_truncated_parquet(tmp_path, damage):
    raw, mpath = _one_dataset(tmp_path, pa.table(GOOD))
    path = os.path.join(raw, "bad.parquet")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncate" else b"not a parquet file" * 9)
    with pytest.raises(DataError, match=r"bad.parquet: cannot read parquet file"):
        prepare_data(raw, mpath, TOKENIZER, str(tmp_path / "out"), workers=1)


def test_tokenizer_without_eos(tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="has no EOS token"):
        load_tokenizer(str(tok_dir))
    raw, mpath = _one_dataset(tmp_path, pa.table(GOOD))
    with pytest.raises(TokenizerError, match="no EOS"):
        prepare_data(raw, mpath, str(tok_dir), str(tmp_path / "out"), workers=1)


def test_doc_id_absent_from_corpus(tmp_path):
    raw, mpath, _ = make_inputs(str(tmp_path))
    out = str(tmp_path / "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    path = os.path.join(out, "clu_query.parquet")
    t = pq.read_table(path)
    ids = t.column("negative_4").to_numpy().copy()
    ids[5] = 12345  # no document has this id
    t = t.set_column(t.column_names.index("negative_4"), "negative_4", pa.array(ids))
    pq.write_table(t, path)
    with pytest.raises(DataError, match=r"clu_query.parquet: row 5, column 'negative_4': doc "
                                        r"id 12345 is absent from the corpus"):
        load_prepared(out, 64)


def test_dataset_smaller_than_one_batch(tmp_path):
    raw, mpath, _ = make_inputs(str(tmp_path), datasets={
        "big": ("retrieval", 120, 8), "tiny": ("clustering", 30, 9)})
    out = str(tmp_path / "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    # 22 training rows, fewer than a step's 8 packs x 4: one partial batch per epoch (it
    # used to stop the run; tests/test_data_pipeline.py checks what such a batch holds).
    it = make_train_iterator(data_config(out), packs=8)
    assert it.plan.small == {"tiny": 22}
    steps = [next(it)[1] for _ in range(it.steps_per_epoch)]
    assert [(s["step_samples"], s["partial"]) for s in steps if s["dataset"] == "tiny"] == \
        [(22, True)]


def test_text_longer_than_seq_len_fails_loudly(tmp_path):
    raw, mpath, _ = make_inputs(str(tmp_path), datasets={"ret": ("retrieval", 60, 8)})
    out = str(tmp_path / "prep")
    prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=64, workers=1, verbose=False)
    with pytest.raises(DataError, match=r"exceeds data.seq_len=8"):
        load_prepared(out, 8)


# ---------------------------------------------------------------------------- recipe caps
def _kept_queries(out, name, tokenizer):
    """Indices i of the 'name query i' rows a prepared dataset kept, in file order."""
    ids = pq.read_table(os.path.join(out, f"{name}_query.parquet")).column(
        "query_input_ids").to_pylist()
    return [int(tokenizer.decode(q[:-1]).split()[2]) for q in ids]


def test_max_rows_per_dataset_is_a_seeded_deterministic_sample(tmp_path, tokenizer, capsys):
    from mlembed_jax.data.prepare import sample_rows

    raw, mpath, rows = make_inputs(str(tmp_path))  # ret 160, clu 120, cls 100 rows
    kw = dict(max_seq_length=48, workers=1, verbose=False)
    outs = {}
    for key, cap, seed in (("a", 110, 0), ("b", 110, 0), ("c", 110, 1), ("all", 0, 0)):
        outs[key] = str(tmp_path / key)
        prepare_data(raw, mpath, TOKENIZER, outs[key], max_rows_per_dataset=cap,
                     sample_seed=seed, verbose=key == "a", **{k: v for k, v in kw.items()
                                                             if k != "verbose"})
    summary = capsys.readouterr().out
    assert "2 dataset(s) above max_rows_per_dataset=110 kept a seeded sample (sample_seed=0)" \
        in summary and "ret 110 of 160" in summary and "clu 110 of 120" in summary
    for name, (_, n, _) in SMALL.items():
        a = _kept_queries(outs["a"], name, tokenizer)
        assert a == _kept_queries(outs["b"], name, tokenizer)  # same seed: same rows
        assert _kept_queries(outs["all"], name, tokenizer) == list(range(n))
        if n <= 110:
            assert a == list(range(n))  # under the cap: every row, in order
            continue
        assert len(a) == 110 and a == sorted(a) and len(set(a)) == 110  # file order kept
        assert a != list(range(110))  # a random sample, not the first rows
        assert a == sample_rows(n, 110, 0, name).tolist()
        assert a != _kept_queries(outs["c"], name, tokenizer)  # another seed, other rows
    info = json.load(open(os.path.join(outs["a"], "prepared.json")))
    assert (info["max_rows_per_dataset"], info["sample_seed"]) == (110, 0)
    assert (info["datasets"]["ret"]["input_rows"], info["datasets"]["ret"]["samples"]) == \
        (160, 110)
    # The cap is part of a dataset's fingerprint: another cap redoes it on rerun.
    res = prepare_data(raw, mpath, TOKENIZER, outs["a"], max_rows_per_dataset=100, **kw)
    assert res.skipped == [] and res.datasets["cls"]["samples"] == 100


def test_classification_keeps_only_negative_1(tmp_path):
    raw, mpath, rows = make_inputs(str(tmp_path), datasets={"cls3": ("classification", 12, 3)})
    out = str(tmp_path / "prep")
    res = prepare_data(raw, mpath, TOKENIZER, out, max_seq_length=48, workers=1, verbose=False)
    q = pq.read_table(os.path.join(out, "cls3_query.parquet"))
    assert q.column_names == ["query_input_ids", "passage", "negative_1"]
    assert (res.datasets["cls3"]["negative_columns"],
            res.datasets["cls3"]["input_negative_columns"]) == (1, 3)


@pytest.mark.integration
def test_manifest_for_the_released_file_names(tmp_path):
    """tools/make_manifest.py on a folder of files named like the released data."""
    import subprocess
    import sys

    from train_helpers import ROOT, subprocess_env

    folder = tmp_path / "released"
    folder.mkdir()
    # Task types as the reference code gives them (reference_task_types.json).
    want = {"amazon_qa": "retrieval", "arxiv_clustering_p2p": "clustering",
            "banking77": "clustering", "amazon_counterfactual": "classification",
            "clirmatrix_af-bg": "retrieval", "cnn_dm": "retrieval"}
    # amazon_qa has the 7 negatives a retrieval dataset samples; the others only negative_1,
    # as some released files do.
    for i, name in enumerate(want):
        negs = range(1, 8 if name == "amazon_qa" else 2)
        pq.write_table(pa.table({"query": [f"q{i} a", f"q{i} b"],
                                 "passage": [f"p{i} a", f"p{i} b"],
                                 **{f"negative_{j}": [f"n{i}.{j} a", f"n{i}.{j} b"]
                                    for j in negs}}),
                       str(folder / f"{name}.parquet"))
    tool = [sys.executable, os.path.join(ROOT, "tools", "make_manifest.py"),
            f"--input_dir={folder}"]
    out = tmp_path / "manifest.json"
    r = subprocess.run(tool + [f"--out={out}"], env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fewer = {"arxiv_clustering_p2p", "banking77", "clirmatrix_af-bg", "cnn_dm"}
    assert json.loads(out.read_text()) == {
        n: {"task_type": t, **({"num_negatives": 1} if n in fewer else {})}
        for n, t in sorted(want.items())}
    assert "6 datasets (1 classification, 2 clustering, 3 retrieval)" in r.stdout
    assert ("4 dataset(s) have fewer negative columns than their task type samples and train "
            "with what they have") in r.stdout
    # The manifest is one prepare_data accepts for that folder.
    res = prepare_data(str(folder), str(out), TOKENIZER, str(tmp_path / "prep"),
                       max_seq_length=32, workers=1, verbose=False)
    assert set(res.datasets) == set(want)
    # Names the reference never had: an error listing every such file, nothing written.
    for extra in ("my_private_set", "zz_other"):
        pq.write_table(pa.table({"query": ["q"], "passage": ["p"], "negative_1": ["n"]}),
                       str(folder / f"{extra}.parquet"))
    bad = subprocess.run(tool + [f"--out={tmp_path / 'm2.json'}"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert ("2 dataset file(s) have no known task type: my_private_set.parquet, "
            "zz_other.parquet") in bad.stderr
    assert not (tmp_path / "m2.json").exists()
    assert len(manifest_lib.reference_task_types()) == 502
# ---------------------------------------------------------------------------- negatives
def test_too_few_negatives_is_an_error_unless_the_manifest_says_so(tmp_path):
    """3 negative columns for a retrieval dataset (which samples 7): an error naming the
    file and the count; accepted with an explicit num_negatives, which training then uses
    exactly and logs, and which a training manifest may not raise again."""
    three = {"ret": ("retrieval", 60, 3)}
    raw, mpath, _ = make_inputs(str(tmp_path / "a"), datasets=three)
    with pytest.raises(DataError, match=r"ret.parquet: 3 negative column\(s\) \(negative_1.."
                                        r"negative_3\), fewer than the 7 hard negatives a "
                                        r"retrieval dataset samples; .*\"num_negatives\": 3"):
        prepare_data(raw, mpath, TOKENIZER, str(tmp_path / "out_a"), workers=1, verbose=False)

    explicit = {"ret": {"task_type": "retrieval", "num_negatives": 3}}
    raw, mpath, _ = make_inputs(str(tmp_path / "b"), datasets=three, manifest_extra=explicit)
    out = str(tmp_path / "out_b")
    prepare_data(raw, mpath, TOKENIZER, out, workers=1, verbose=False)
    with open(os.path.join(out, "prepared.json")) as f:
        assert json.load(f)["manifest"]["ret"]["num_negatives"] == 3
    it = make_train_iterator(data_config(out), packs=2)
    assert it.negatives_summary() == [
        "ret: retrieval, 3 negatives (manifest num_negatives; default 7)"]
    batch, _ = next(it)
    assert (batch["negative_valid"][batch["sample_valid"]].sum(-1) == 3).all()

    default = tmp_path / "default.json"
    default.write_text(json.dumps({"ret": "retrieval"}))
    with pytest.raises(DataError, match=r"dataset 'ret' \(.*ret_query.parquet\) has 3 negative "
                                        r"column\(s\), fewer than the 7"):
        make_train_iterator(data_config(out, manifest=str(default)), packs=2)


def test_invalid_utf8_names_file_row_and_column(tmp_path):
    bad = pa.array([b"q0", b"q1", b"caf\xe9"], pa.binary()).view(pa.string())  # Latin-1 é
    with pytest.raises(DataError, match=r"bad.parquet: row 2, column 'query': invalid UTF-8 "
                                        r"\(unexpected end of data at byte 3"):
        _prep(tmp_path, pa.table(dict(GOOD, query=bad)))


# ---------------------------------------------------------------------------- fuzz
_TEXTS = ["Deutschland", "Москва", "東京 タワー", "القاهرة", "emoji 🙂🚀", "tab\tand\nnewline",
          "nul\x00byte", "long " + "Zürich " * 300, "x"]
_BAD_CELLS = [None, "", "   ", b"\xff\xfe", 7]  # null, empty, blank, not UTF-8, not a string


def _fuzz_case(rng):
    """(table, manifest entry, why it must fail or None). Mostly valid tables with one fault
    at a time, so both outcomes are common."""
    n = rng.choice([1, 2, 5, 30])
    task = rng.choice(["retrieval", "clustering", "classification"])
    entry = {"task_type": task}
    k = rng.randint(1, 10)
    if rng.random() < 0.3:
        entry["num_negatives"] = rng.randint(1, k)
    want = entry.get("num_negatives", manifest_lib.DEFAULT_NEGATIVES[task])
    if rng.random() < 0.3:
        entry["query_prefix"] = rng.choice(["query: ", "問: "])
    cols = {c: [rng.choice(_TEXTS) + f" {c} {i}" for i in range(n)]
            for c in ["query", "passage"] + [f"negative_{j}" for j in range(1, k + 1)]}
    # A classification dataset trains on negative_1 only (the recipe): the others are not read.
    used = 1 if task == "classification" else k
    why = None if used >= want else "negatives"
    fault = rng.choice(["none", "none", "cell", "missing", "gap", "type", "extra", "dict"])
    col = rng.choice(sorted(cols))
    ignored = col.startswith("negative_") and int(col.split("_")[1]) > used
    if fault == "cell":
        bad = rng.choice(_BAD_CELLS)
        cols[col][rng.randrange(n)] = bad
        if not ignored:
            why = why or {type(None): "null", str: "empty", bytes: "invalid UTF-8",
                          int: "expected a string"}[type(bad)]
    elif fault == "missing":  # not the last negative: that would only lower the count
        del cols[rng.choice(["query", "passage"] + [f"negative_{j}" for j in range(1, max(k, 2))])]
        why = why or "missing column"
    elif fault == "gap" and k >= 2:
        del cols["negative_1"]
        why = why or "missing column 'negative_1'"
    elif fault == "type":
        cols[col] = [float(i) for i in range(n)]
        if not ignored:
            why = why or "expected a string"
    elif fault == "extra":
        cols["score"] = [rng.random() for _ in range(n)]  # other columns are ignored
    arrays = {}
    for c, values in cols.items():
        if all(isinstance(v, float) for v in values):
            arrays[c] = pa.array(values, pa.float64())
        elif any(isinstance(v, bytes) for v in values):
            raw = [v if isinstance(v, bytes) or v is None else v.encode() for v in values]
            arrays[c] = pa.array(raw, pa.binary()).view(pa.string())
        elif any(isinstance(v, int) for v in values):  # a number among texts: an int column
            arrays[c] = pa.array([v if isinstance(v, int) else i for i, v in enumerate(values)],
                                 pa.int64())
        elif fault == "dict" and c == col:
            arrays[c] = pa.array(values).dictionary_encode()  # categorical: still the texts
        else:
            arrays[c] = pa.array(values, rng.choice([pa.string(), pa.large_string()]))
    return pa.table(arrays), entry, why


def test_fuzz_prepare_inputs_clean_error_or_exact_result(tmp_path, tokenizer):
    """Random column sets, types, nulls, encodings and sizes: every case is a one-line
    DataError naming the file (and the reason the case was built to fail for), or a result
    whose every query and document is exactly the input text tokenised (checked against a
    plain tokenizer call and the doc-id hash), never a traceback or a changed text."""
    import random

    from mlembed_jax.data.prepare import doc_id_of

    rng = random.Random(0)
    seen = {"ok": 0, "error": 0}
    for case in range(40):
        table, entry, why = _fuzz_case(rng)
        root = tmp_path / str(case)
        (root / "raw").mkdir(parents=True)
        pq.write_table(table, root / "raw" / "f.parquet")
        (root / "m.json").write_text(json.dumps({"f": entry}))
        try:
            prepare_data(str(root / "raw"), str(root / "m.json"), TOKENIZER, str(root / "out"),
                         max_seq_length=32, workers=1, verbose=False)
        except DataError as e:
            msg = str(e)
            assert why is not None, (case, msg)
            assert "f.parquet" in msg and "\n" not in msg, (case, msg)
            if why != "negatives":  # several faults: the first one found is named
                assert why in msg or "negative" in msg, (case, why, msg)
            seen["error"] += 1
            continue
        assert why is None, (case, why)
        seen["ok"] += 1
        q = pq.read_table(root / "out" / "f_query.parquet")
        prefix = entry.get("query_prefix", "")
        texts = table.column("query").cast(pa.string()).to_pylist()
        want = [tokenizer(prefix + t, add_special_tokens=False, truncation=True,
                          max_length=31)["input_ids"] + [1] for t in texts]
        assert q.column("query_input_ids").to_pylist() == want, case
        for c in [c for c in q.column_names if c != "query_input_ids"]:
            docs = table.column(c).cast(pa.string()).to_pylist()
            assert q.column(c).to_pylist() == [doc_id_of(t) for t in docs], (case, c)
    assert seen["ok"] >= 8 and seen["error"] >= 8, seen


def test_a_relative_tokenizer_path_is_looked_up_beside_the_data_not_in_the_checkout(
        tmp_path, monkeypatch):
    """prepared.json records the tokenizer path as prepare_data was given it (the demo's is
    relative). It is found from the current directory or the prepared data's own location
    (so the shipped demo finds its tokenizer wherever the package is installed), never from
    the repository checkout: elsewhere it is None, and callers ask for the tokenizer."""
    from mlembed_jax.data import DEMO_TOKENIZER
    from mlembed_jax.data.prepared import find_tokenizer_dir

    with open(os.path.join(DEMO_PREPARED, "prepared.json")) as f:
        recorded = json.load(f)["tokenizer_dir"]
    assert not os.path.isabs(recorded)
    monkeypatch.chdir(tmp_path)
    found = find_tokenizer_dir(recorded, DEMO_PREPARED)
    assert os.path.realpath(found) == os.path.realpath(DEMO_TOKENIZER)
    (tmp_path / "prepared").mkdir()
    assert find_tokenizer_dir(recorded, str(tmp_path / "prepared")) is None
