"""The hard-negative miner: its filters on hand-computed scores; planted false negatives
(duplicates, whitespace variants, the same name in other languages) that the filters remove
and plain top-k keeps; determinism; before filtering it equals sentence-transformers'
mine_hard_negatives; its output goes through prepare_data into a training run; it shares the
embedding store with tools/eval_retrieval.py.

The model is the small one trained on cldr_names that conftest's names_run trains once per
session (500 steps): its names of one entity in 18 languages are the natural paraphrases.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from retrieval_helpers import DEMO_DATA, write_beir
from tool_helpers import load_tool

from mlembed_jax import encode as enc
from mlembed_jax import mining
from mlembed_jax.embedding_store import EmbeddingStore

NAMES = os.path.join(DEMO_DATA, "raw", "cldr_names.parquet")


def _pairs(n=None):
    t = pq.read_table(NAMES)
    q, p = t.column("query").to_pylist(), t.column("passage").to_pylist()
    return (q, p) if n is None else (q[:n], p[:n])


@pytest.fixture(scope="module")
def names_model(names_run):
    work, _ = names_run
    model = enc.load(work)
    store = EmbeddingStore(None, model)  # in memory: each distinct text encoded once

    def embed(texts):
        return store.embed(model.tokenize(texts))

    return work, model, embed


# --------------------------------------------------------------------------- the rules

def _unit(score):
    """A 2-d unit vector whose cosine with the query (1, 0) is `score`."""
    return np.array([score, np.sqrt(1 - score * score)], np.float32)


# Query "Q" has two positives (two rows); every other text's score with Q is set by hand.
SCORES = {"pos": 0.8, "pos2": 0.85, "a": 0.9, "b": 0.77, "c": 0.75, "d": 0.7, " d": 0.69,
          "e": 0.6, " pos\t": 0.5, "  Q": 0.4}


def _hand_embed(texts):
    return np.stack([np.array([1, 0], np.float32) if t == "Q" else _unit(SCORES[t])
                     for t in texts])


def _hand_mine(**kw):
    extra = [t for t in SCORES if not t.startswith("pos")]
    settings = mining.MiningSettings(**{"negatives": 2, "depth": 10, **kw})
    return mining.mine("hand", ["Q", "Q"], ["pos", "pos2"], extra, _hand_embed, _hand_embed,
                       settings)


def _negatives(mined):
    t = mined.table.to_pydict()
    return [[t[c][i] for c in t if c.startswith("negative_")] for i in range(mined.table.num_rows)]


def test_filters_on_hand_computed_scores():
    # Row 0 (positive 0.8): ratio 0.95 drops scores above 0.76 (a 0.9, b 0.77); row 1
    # (positive 0.85) drops above 0.8075 (a). " pos\t" is pos with other whitespace, "  Q" is
    # the query, " d" repeats d: removed whatever their score. Neither row ever gets the
    # other's positive (both are positives of Q).
    m = _hand_mine()
    assert _negatives(m) == [["c", "d"], ["b", "c"]]
    assert m.stats["removed"] == {"positive_variant": 2, "query_text": 2, "duplicate": 2,
                                  "rank_window": 0, "margin": 0, "score_ratio": 3}
    assert m.stats["candidates_examined"] == 16  # 8 non-positive texts x 2 rows
    # Before any filter: the nearest non-positive texts, as plain top-k mining gives them.
    assert [[m.corpus[j] for j in row] for row in m.naive] == [["a", "b"], ["a", "b"]]
    # An absolute margin of 0.09 (row 0: above 0.71; row 1: above 0.76) comes first.
    m = _hand_mine(margin=0.09)
    assert _negatives(m) == [["d", "e"], ["c", "d"]]
    assert m.stats["removed"]["margin"] == 5 and m.stats["removed"]["score_ratio"] == 0
    # The rank window skips the 3 nearest (a, b, c); ranks count the unfiltered candidates.
    m = _hand_mine(rank_min=3)
    assert _negatives(m) == [["d", "e"], ["d", "e"]]
    assert m.stats["removed"]["rank_window"] == 6
    # Filters off: still never the positives, a whitespace variant of one, the query, or a
    # duplicate.
    assert _negatives(_hand_mine(max_score_ratio=None)) == [["a", "b"], ["a", "b"]]


def test_rows_with_fewer_than_k_survivors():
    # K = 4: row 0 keeps c, d, e (3); row 1 keeps b, c, d, e.
    m = _hand_mine(negatives=4)
    assert m.stats["rows_short"] == 1 and _negatives(m) == [["b", "c", "d", "e"]]
    assert m.table.column("passage").to_pylist() == ["pos2"]
    m = _hand_mine(negatives=4, if_short="repeat")
    assert _negatives(m) == [["c", "d", "e", "c"], ["b", "c", "d", "e"]]
    assert m.stats["rows_repeated"] == 1
    m = _hand_mine(negatives=4, if_short="shrink")
    assert _negatives(m) == [["c", "d", "e"], ["b", "c", "d"]]
    assert m.stats["negative_columns"] == 3
    assert '"num_negatives": 3' in m.stats["note"] and "retrieval" in m.stats["note"]
    with pytest.raises(mining.MiningError, match="--depth=3 must be at least --negatives=4"):
        _hand_mine(negatives=4, depth=3)
    with pytest.raises(mining.MiningError, match="max_score_ratio=1.5 must be in"):
        _hand_mine(max_score_ratio=1.5)
    # Nothing left anywhere: an error that says what to relax, not an empty file.
    with pytest.raises(mining.MiningError, match=r"hand: no row keeps 1 negative.*survivors "
                                                 r"in a row: 0.*raise --depth"):
        _hand_mine(max_score_ratio=0.1, if_short="repeat")


def test_run_checks_its_settings_and_files_before_the_model_loads(tmp_path):
    """mining.run(job, settings, model, point): each refusal comes before any model is read
    (the model path here does not exist), and an output directory it made is taken back."""
    src = tmp_path / "pairs"
    src.mkdir()
    pq.write_table(pq.read_table(NAMES).slice(0, 5).select(["query", "passage"]),
                   src / "names.parquet")
    nowhere = enc.ModelSettings(str(tmp_path / "no_model"))
    out = tmp_path / "a" / "mined"
    job = mining.MiningJob(inputs=[str(src)], output_dir=str(out))
    with pytest.raises(mining.MiningError, match="--negatives=0 must be at least 1"):
        mining.run(job, mining.MiningSettings(negatives=0), nowhere)
    with pytest.raises(mining.MiningError, match="would overwrite the input"):
        mining.run(dataclasses.replace(job, output_dir=str(src)), mining.MiningSettings(),
                   nowhere)
    with pytest.raises(enc.EncodeError, match="no_model' does not exist"):
        mining.run(job, mining.MiningSettings(), nowhere, enc.EncodeSettings(progress=False))
    assert not (tmp_path / "a").exists()  # run made a/mined, and removed both again
    out.mkdir(parents=True)
    (out / "names.parquet").write_bytes(b"earlier")
    with pytest.raises(mining.MiningError, match="names.parquet exists; pass --overwrite"):
        mining.run(job, mining.MiningSettings(), nowhere)
    with pytest.raises(enc.EncodeError, match="does not exist"):
        mining.run(dataclasses.replace(job, overwrite=True), mining.MiningSettings(), nowhere)
    assert (out / "names.parquet").read_bytes() == b"earlier"  # not replaced: nothing mined


# --------------------------------------------------------------------------- a real model

def _entities(queries, passages):
    """Name -> entity: the connected groups of the (query, passage) pairs (each cldr_names
    pair names one entity in two languages)."""
    parent: dict[str, str] = {}

    def root(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for q, p in zip(queries, passages):
        parent[root(q)] = root(p)
    return {x: root(x) for x in parent}


@pytest.mark.integration
def test_planted_false_negatives_are_removed_where_plain_top_k_keeps_them(names_model):
    _, model, embed = names_model
    queries, passages = _pairs()
    K = 24
    targets = range(0, 600, 20)  # 30 rows get planted copies of their positive
    planted = {}
    for i in targets:
        p = passages[i]
        for text in (p, " " + p, p + " ", "\t" + p.replace(" ", "\n")):  # a copy, 3 spacings
            planted.setdefault(text, set()).add(i)
    m = mining.mine("names", queries, passages, list(planted), embed, embed,
                    mining.MiningSettings(negatives=K, if_short="repeat"))
    rows = m.table.to_pydict()
    kept = len(rows["query"])
    # "repeat" keeps every row with a survivor (measured: 2679 of 2712; the others' positive
    # scores so low that the ratio leaves nothing).
    assert kept == m.stats["rows_out"] > 0.95 * len(queries)

    # Plain top-k, a NumPy oracle: the corpus as given (copies are separate entries), each
    # row excluding only its own positive's entry.
    raw = list(dict.fromkeys(passages)) + list(planted)
    own = {t: i for i, t in enumerate(raw[:len(set(passages))])}
    d = np.asarray(embed(raw))
    kept_by_plain = 0
    for i in targets:
        s = d @ np.asarray(embed([queries[i]]))[0]
        s[own[passages[i]]] = -np.inf
        top = {raw[j] for j in np.argsort(-s, kind="stable")[:K]}
        kept_by_plain += sum(i in planted.get(t, ()) for t in top)
    print(f"plain top-{K} keeps {kept_by_plain} of the {4 * len(targets)} planted texts")
    assert kept_by_plain >= 30  # measured: 70 of the 120 planted texts

    # Ours: no row gets its own positive, another positive of its query, any whitespace
    # variant of them, or its query, as a negative.
    norm = mining.normalize_whitespace
    positives: dict[str, set] = {}
    for q, p in zip(queries, passages):
        positives.setdefault(norm(q), set()).add(norm(p))
    negs = _negatives(m)
    for q, row in zip(rows["query"], negs):
        bad = positives[norm(q)] | {norm(q)}
        assert not {norm(t) for t in row} & bad, q
    assert m.stats["removed"]["positive_variant"] > 0 and m.stats["removed"]["query_text"] > 0

    # Paraphrases: the same entity named in another language. Plain top-k is full of them;
    # the 0.95 ratio removes most (measured: 44% of plain top-24 vs 15% after the filters),
    # and every negative kept scores at most 0.95 x its positive (the model, re-run here).
    ent = _entities(queries, passages)
    same_naive = np.mean([ent.get(norm(m.corpus[j])) == ent[q]
                          for q, row in zip(queries, m.naive) for j in row if j >= 0])
    same_out = np.mean([ent.get(norm(t)) == ent[q] for q, row in zip(rows["query"], negs)
                        for t in row])
    print(f"same-entity share: plain top-{K} {same_naive:.3f}, after the filters {same_out:.3f}")
    assert same_naive > 0.3 and same_out < 0.5 * same_naive
    q_emb = model.encode(rows["query"][:300])
    p_emb = model.encode(rows["passage"][:300])
    texts = sorted({t for row in negs[:300] for t in row})
    n_emb = dict(zip(texts, model.encode(texts)))
    for i in range(300):
        s_pos = float(q_emb[i] @ p_emb[i])
        s_neg = np.array([n_emb[t] @ q_emb[i] for t in negs[i]])
        assert np.all(s_neg <= s_pos - 0.05 * abs(s_pos) + 1e-5)


@pytest.mark.integration
def test_seeded_sampling_is_deterministic(names_model):
    _, _, embed = names_model
    queries, passages = _pairs(400)

    def run(**kw):
        s = mining.MiningSettings(negatives=8, depth=40, **kw)
        return _negatives(mining.mine("names", queries, passages, [], embed, embed, s))

    top = run()
    assert run(seed=5) == top  # "top" has nothing to draw
    a, b, c = run(sampling="random"), run(sampling="random"), run(sampling="random", seed=1)
    assert a == b and a != c and a != top
    # Random draws come from the same survivors: each row's draw is a subset of the
    # survivors, i.e. of the top-40 with the filters, written hardest first.
    wide = _negatives(mining.mine("names", queries, passages, [], embed, embed,
                                  mining.MiningSettings(negatives=40, depth=40,
                                                      if_short="shrink")))
    assert all(set(r) <= set(w) or len(set(w)) < 40 for r, w in zip(a, wide))
    rank = [{t: k for k, t in enumerate(w)} for w in wide]
    assert all([rk[t] for t in r] == sorted(rk[t] for t in r)
               for r, rk in zip(a, rank) if set(r) <= set(rk))


@pytest.fixture(scope="module")
def exported(names_model, tmp_path_factory):
    """The model exported by tools/export_hf's code (fp32, full size): HF + ST files."""
    from mlembed_jax.export import export_checkpoint

    out = tmp_path_factory.mktemp("mining_export") / "export"
    return export_checkpoint(names_model[0], str(out), dtype="fp32")["out_dir"]


@pytest.mark.integration
def test_before_filtering_equals_sentence_transformers_mine_hard_negatives(exported):
    """On the same exported model and pairs, our candidates before the filters are exactly
    sentence-transformers' top-k negatives (n-tuple, no margins), up to ties."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    out = exported
    queries, passages = _pairs(800)
    K = 10
    model = enc.load(out)
    m = mining.mine("names", queries, passages, [], model.encode, model.encode,
                    mining.MiningSettings(negatives=K, depth=K, max_score_ratio=None,
                                        if_short="repeat"))
    st = SentenceTransformer(out, device="cpu")
    ds = mine_hard_negatives(Dataset.from_dict({"query": queries, "passage": passages}), st,
                             num_negatives=K, output_format="n-tuple", batch_size=64,
                             verbose=False)
    assert len(ds) == len(queries)  # every row has K negatives
    ours = {(q, p): [m.corpus[j] for j in row] for q, p, row in zip(queries, passages, m.naive)}
    emb = dict(zip(m.corpus, model.encode(m.corpus)))
    same = 0
    for row in ds:
        q, p = row["query"], row["passage"]
        theirs = [row[f"negative_{k}"] for k in range(1, K + 1)]
        if ours[(q, p)] == theirs:
            same += 1
            continue
        # Ties: the same scores, possibly other texts at equal scores.
        qe = model.encode([q])[0]
        np.testing.assert_allclose(sorted(emb[t] @ qe for t in ours[(q, p)]),
                                   sorted(emb[t] @ qe for t in theirs), atol=1e-5)
    assert same > 0.95 * len(ds)  # measured: all 2712 rows of cldr_names equal at K = 10


@pytest.mark.integration
def test_cli_output_goes_through_prepare_data_into_training(names_model, tmp_path, capsys):
    """The smoke run: the tool on the demo pairs, then prepare_data and a short training."""
    from train_helpers import small_config

    from mlembed_jax.data import DEMO_TOKENIZER
    from mlembed_jax.data.prepare import prepare_data
    from mlembed_jax.train import run

    work, _, _ = names_model
    src = tmp_path / "pairs"
    src.mkdir()
    queries, passages = _pairs(600)
    pq.write_table(pq.read_table(NAMES).slice(0, 600).select(["query", "passage"]),
                   src / "cldr_names.parquet")
    out = tmp_path / "mined"
    tool = load_tool("mine_negatives")
    assert tool.main([f"--model={work}", f"--input={src}", f"--output_dir={out}",
                      "--negatives=8", "--depth=48", "--if_short=shrink", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "cldr_names: 600 rows" in printed.out and "removed:" in printed.out
    summary = json.load(open(out / "mining_summary.json"))
    st = summary["datasets"]["cldr_names"]
    # Every examined candidate is either removed by one filter or survives.
    survivors = st["survivors_per_row"]["mean"] * st["rows_in"]
    assert sum(st["removed"].values()) + survivors == pytest.approx(st["candidates_examined"])
    assert sum(st["histogram"]["positive"]) == 600
    with open(summary["histogram_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(out / "cldr_names.parquet")
    assert table.column_names[:3] == ["query", "passage", "negative_1"]

    manifest = tmp_path / "manifest.json"
    # "shrink" writes as many columns as the row with the fewest survivors has; a retrieval
    # dataset samples 7, so with fewer the manifest must say how many (prepare_data refuses
    # it otherwise), as the summary's note tells the user.
    width = st["negative_columns"]
    entry = {"task_type": "retrieval"}
    if width < 7:
        assert f'"num_negatives": {width}' in st["note"]
        entry["num_negatives"] = width
    manifest.write_text(json.dumps({"cldr_names": entry}))
    prepared = tmp_path / "prepared"
    prepare_data(str(out), str(manifest), DEMO_TOKENIZER, str(prepared), max_seq_length=64,
                 workers=1, verbose=False)
    config = small_config(**{"data.prepared_dir": str(prepared), "data.manifest": str(manifest),
                             "train.max_steps": 3, "mesh.num_devices": 1})
    assert run(config, str(tmp_path / "run")) == 0
    losses = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(np.isfinite(m["train/total"]) for m in losses if "train/total" in m)

    # User errors: one line, exit code 2.
    assert tool.main([f"--model={work}", f"--input={src}", f"--output_dir={out}",
                      "--quiet"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pq.read_table(NAMES).slice(0, 5).select(["query"]), bad / "x.parquet")
    assert tool.main([f"--model={work}", f"--input={bad}", f"--output_dir={tmp_path / 'o'}",
                      "--quiet"]) == 2
    assert "x.parquet: missing column 'passage'" in capsys.readouterr().err


@pytest.mark.integration
def test_eval_retrieval_and_the_miner_share_one_embedding_store(names_model, tmp_path):
    work, _, _ = names_model
    queries, passages = _pairs(300)
    docs = list(dict.fromkeys(passages))
    qs = list(dict.fromkeys(queries))
    doc_id = {t: f"d{i}" for i, t in enumerate(docs)}
    beir = write_beir(tmp_path / "beir", [{"_id": doc_id[t], "text": t} for t in docs],
                      [{"_id": f"q{i}", "text": t} for i, t in enumerate(qs)],
                      [(f"q{qs.index(q)}", doc_id[p], 1) for q, p in zip(queries, passages)])
    cache = tmp_path / "cache"
    ev = load_tool("eval_retrieval")
    r1, r2 = tmp_path / "r1.json", tmp_path / "r2.json"
    assert ev.main([f"--model={work}", f"--beir_dir={beir}", f"--cache_dir={cache}",
                    f"--output={r1}", "--quiet"]) == 0
    parts = sorted(os.listdir(cache))
    assert ev.main([f"--model={work}", f"--beir_dir={beir}", f"--cache_dir={cache}",
                    f"--output={r2}", "--quiet"]) == 0
    assert sorted(os.listdir(cache)) == parts  # the second run encoded nothing
    m1, m2 = (json.load(open(r))["results"][0]["metrics"] for r in (r1, r2))
    assert m1["ndcg@10"] == m2["ndcg@10"] and m1["recall@100"] == m2["recall@100"]
    # The miner, on the same texts, reads every embedding from the store.
    src = tmp_path / "pairs"
    src.mkdir()
    pq.write_table(pq.read_table(NAMES).slice(0, 300).select(["query", "passage"]),
                   src / "names.parquet")
    job = mining.MiningJob(inputs=[str(src)], output_dir=str(tmp_path / "out"),
                           corpus_files=[os.path.join(beir, "corpus.jsonl")],
                           cache_dir=str(cache))
    summary = mining.run(job, mining.MiningSettings(negatives=4, depth=16, if_short="repeat"),
                         enc.ModelSettings(work), enc.EncodeSettings(progress=False),
                         log=lambda *_: None)
    assert summary["timing"]["encoded_texts"] == 0
    assert sorted(os.listdir(cache)) == parts


@pytest.mark.integration
def test_bench_encode_runs_both_sides_on_one_model(exported, tmp_path, capsys):
    """tools/bench_encode.py, as a smoke run: both encoders on the same texts give the same
    embeddings (timings on a CPU mean little)."""
    out = tmp_path / "bench.json"
    assert load_tool("bench_encode").main([f"--model={exported}", "--samples=2",
                                       "--max_seq_length=128", "--batch_size=4",
                                       "--batch_tokens=512", f"--output={out}"]) == 0
    assert "ratio:" in capsys.readouterr().out
    r = json.load(open(out))
    assert r["texts"] == 18 and r["max_abs_embedding_diff"] < 1e-4
    assert r["ours"]["texts_per_s"] > 0 and r["sentence_transformers"]["texts_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["ours"]["texts_per_s"]
                                       / r["sentence_transformers"]["texts_per_s"])
