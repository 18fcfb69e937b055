"""MTEB at a Matryoshka point: the adapter's scores on local tasks (a BEIR-format retrieval
set, an STS file) against pytrec_eval / our own nDCG and scipy's Spearman on the same
embeddings, the prompts each side gets, tools/eval_mteb.py's result files and errors, and an
export scored through sentence-transformers giving the adapter's numbers. Offline: no Hub."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from retrieval_helpers import write_beir
from tool_helpers import load_tool

from mlembed_jax import encode as enc
from mlembed_jax.data.text_encoding import load_tokenizer
from mlembed_jax.eval import retrieval as rev
from mlembed_jax.model.encoder import init_params
from mlembed_jax.model.qwen3 import EncoderConfig


def mods():
    """(mteb, eval.mteb_adapter, eval.mteb_tasks), imported when a test runs: importing mteb
    takes ~4 s, which every test session would otherwise pay at collection."""
    import mteb

    from mlembed_jax.eval import mteb_adapter, mteb_tasks

    return mteb, mteb_adapter, mteb_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "mlembed_jax", "demo_data", "tokenizer")
# test_encode's 4-layer model: exits (1, 2, 4), ranks (8, 16, 32), dims (8, ..., 64).
CFG = EncoderConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, mel=True, mel_r_max=32,
                    mel_r_min=8)

# Hand-written: names of months and weekdays, each query's relevant docs are its
# translations (grade 2) and, for q1, a related name (grade 1).
CORPUS = [{"_id": f"d{i}", "text": t} for i, t in enumerate(
    ["January", "janvier", "enero", "February", "février", "Monday", "lundi", "lunes",
     "Tuesday", "mardi", "martes", "Sunday", "dimanche", "domingo", "März", "mars"])]
QUERIES = [{"_id": "q0", "text": "Januar"}, {"_id": "q1", "text": "Montag"},
           {"_id": "q2", "text": "Dienstag"}, {"_id": "q3", "text": "Sonntag"},
           {"_id": "q4", "text": "Februar"}]
QRELS = [("q0", "d0", 2), ("q0", "d1", 2), ("q0", "d2", 2), ("q1", "d5", 2), ("q1", "d6", 2),
         ("q1", "d8", 1), ("q2", "d8", 2), ("q2", "d9", 2), ("q3", "d11", 2),
         ("q3", "d12", 2), ("q3", "d13", 2), ("q4", "d3", 2), ("q4", "d4", 2)]
STS = [("Januar", "January", 5.0), ("Januar", "Monday", 0.0), ("lundi", "Monday", 5.0),
       ("lundi", "mardi", 2.0), ("enero", "février", 1.0), ("Sonntag", "Sunday", 5.0),
       ("Sonntag", "Tuesday", 0.5), ("März", "mars", 4.5)]


@pytest.fixture(scope="module")
def model():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    return enc.Encoder(params=params, cfg=CFG, tokenizer=load_tokenizer(TOKENIZER),
                       max_seq_length=64)


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    beir = write_beir(root / "months_retrieval", CORPUS, QUERIES, QRELS)
    sts = root / "months_sts"
    sts.mkdir()
    with open(sts / "test.jsonl", "w") as f:
        f.writelines(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
                     for a, b, s in STS)
    return beir, str(sts)


def run_mteb(encoder, paths):
    mteb, _, mt = mods()
    tasks = [mt.local_task(p) for p in paths]
    result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=False)
    assert not result.exceptions
    return {r.task_name: r for r in result.task_results}


def test_retrieval_scores_equal_pytrec_eval_and_ours_on_the_same_embeddings(model, task_dirs):
    mteb, ma, _ = mods()
    import pytrec_eval

    beir, _ = task_dirs
    prompts = ma.TaskPrompts(custom={"Retrieval-query": "query: ",
                                     "Retrieval-document": "doc: "})
    encoder = ma.MTEBEncoder(model, ma.Point(16, 2, 32), prompts, name="test/m")
    assert isinstance(encoder, mteb.models.EncoderProtocol)
    got = run_mteb(encoder, [beir])["months_retrieval"].scores["test"][0]
    # The same embeddings, computed here: prefixes by hand, cosine = dot of unit vectors.
    q = model.encode([x["text"] for x in QUERIES], rank=16, exit=2, dim=32, prefix="query: ")
    d = model.encode([x["text"] for x in CORPUS], rank=16, exit=2, dim=32, prefix="doc: ")
    scores = q @ d.T
    run = {x["_id"]: {c["_id"]: float(s) for c, s in zip(CORPUS, row)}
           for x, row in zip(QUERIES, scores)}
    qrels = {}
    for qid, did, g in QRELS:
        qrels.setdefault(qid, {})[did] = g
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(
        run)
    ndcg = np.mean([v["ndcg_cut_10"] for v in per_query.values()])
    assert got["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-5)  # mteb rounds to 5 digits
    assert got["recall_at_100"] == pytest.approx(1.0)  # 16 docs: all are in the top 100
    # Our own (hand-written, BEIR's definition) metrics agree too.
    ranked = {qid: [CORPUS[j]["_id"] for j in np.argsort(-row, kind="stable")]
              for qid, row in zip([x["_id"] for x in QUERIES], scores)}
    ours = rev.retrieval_metrics(ranked, qrels)
    assert got["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-5)
    assert got["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-5)
    assert encoder.prompts.used[("months_retrieval", "query")][0] == "query: "
    assert encoder.prompts.used[("months_retrieval", "document")][0] == "doc: "


def test_sts_score_equals_scipy_spearman_on_the_same_embeddings(model, task_dirs):
    _, ma, _ = mods()
    from scipy.stats import spearmanr

    _, sts = task_dirs
    encoder = ma.MTEBEncoder(model, ma.Point(8, 1, 16), ma.TaskPrompts(), name="test/m")
    got = run_mteb(encoder, [sts])["months_sts"].scores["test"][0]
    # No prompts file, manifest or model prompts: the paper's instruction on both sides of
    # a symmetric task, the instruction being mteb's default for STS.
    prompt, source = encoder.prompts.used[("months_sts", None)]
    assert prompt == "Instruct: Retrieve semantically similar text.\nQuery:"
    assert "task instruction" in source
    a = model.encode([x[0] for x in STS], rank=8, exit=1, dim=16, prefix=prompt)
    b = model.encode([x[1] for x in STS], rank=8, exit=1, dim=16, prefix=prompt)
    want = spearmanr(np.sum(a * b, axis=1), [x[2] for x in STS]).statistic
    assert got["cosine_spearman"] == pytest.approx(want, abs=1e-5)
    assert got["main_score"] == got["cosine_spearman"]


def test_grid_sharing_gives_the_single_point_numbers(model, task_dirs):
    """The report's shared encode (one pass of all exits per text list, dims as prefixes)
    scores exactly as separate encoders do."""
    _, ma, _ = mods()
    shared = {}
    for exit, dim in ((1, 16), (2, 32)):
        grid = ma.MTEBEncoder(model, ma.Point(16, exit, dim), ma.TaskPrompts(), name="t/g",
                              shared=shared, grid_exits=(1, 2))
        alone = ma.MTEBEncoder(model, ma.Point(16, exit, dim), ma.TaskPrompts(), name="t/a")
        g = run_mteb(grid, list(task_dirs))
        s = run_mteb(alone, list(task_dirs))
        for name in g:
            assert g[name].get_score() == pytest.approx(s[name].get_score(), abs=1e-5)
    assert len(shared) == 4  # queries, corpus, STS sentence1s, sentence2s: each encoded once


def test_points_parse_and_check(model):
    _, ma, _ = mods()
    assert ma.parse_points("r8:e2:d16, full,d32") == [ma.Point(8, 2, 16), ma.Point(),
                                                      ma.Point(dim=32)]
    for bad in ("r8:r16", "x3", "e1:", ""):
        with pytest.raises(ma.MTEBError, match="--points"):
            ma.parse_points(bad)
    # "full" and its explicit values are one point (one set of result files).
    assert [r for _, r in ma.resolve_points(model, ma.parse_points("full,r32:e4:d64"))] == [
        (32, 4, 64)]
    with pytest.raises(enc.EncodeError, match="exit=3 is not one of the model's MLL exits"):
        ma.resolve_points(model, [ma.Point(exit=3)])
    assert ma.point_label(8, 2, 16) == "r8-e2-d16" and ma.point_label(None, 2, 16) == "e2-d16"


def test_prompt_sources_and_bad_prompts_file(model, tmp_path):
    mteb, ma, mt = mods()
    meta = mt.local_task(write_beir(tmp_path / "r", CORPUS, QUERIES, QRELS)).metadata
    q, d = mteb.types.PromptType.query, mteb.types.PromptType.document
    # The training manifest's prefixes for the task type; a disagreeing manifest is an error.
    p = ma.TaskPrompts(by_type={"retrieval": {"query": "calendar: ", "document": ""}})
    assert (p.prompt(meta, q), p.prompt(meta, d)) == ("calendar: ", "")
    p = ma.TaskPrompts(by_type={"retrieval": "its retrieval datasets disagree"})
    with pytest.raises(ma.MTEBError, match="disagree"):
        p.prompt(meta, q)
    # The paper's default: the instruction on queries, nothing on documents.
    p = ma.TaskPrompts()
    assert p.prompt(meta, q).startswith("Instruct: ") and p.prompt(meta, d) == ""
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"NoSuchKind-query": "x"}))
    with pytest.raises(ma.MTEBError, match="p.json: 'NoSuchKind-query' is not an mteb prompt key"):
        ma.read_prompts_file(str(bad))


def test_prompts_from_a_training_manifest(tmp_path):
    """Per manifest task type: the shared prefixes of its datasets, or, when they differ,
    an error that asks for a choice; --prompts=instruct ignores the manifest."""
    _, ma, _ = mods()
    import types

    import ml_collections

    manifest = {"a": {"task_type": "retrieval", "query_prefix": "q: ", "document_prefix": "d: "},
                "b": {"task_type": "retrieval", "query_prefix": "q: ", "document_prefix": "d: "},
                "c": {"task_type": "classification", "query_prefix": "x: "},
                "e": {"task_type": "clustering", "query_prefix": "1: "},
                "f": {"task_type": "clustering", "query_prefix": "2: "}}
    (tmp_path / "prepared.json").write_text(json.dumps({"manifest": manifest}))
    run = types.SimpleNamespace(prefixes={}, train_config=ml_collections.ConfigDict(
        {"data": {"prepared_dir": str(tmp_path), "manifest": ""}}))
    p = ma.TaskPrompts.of(run)
    assert p.by_type["retrieval"] == {"query": "q: ", "document": "d: "}
    assert p.by_type["classification"] == {"query": "x: ", "document": ""}
    assert "clustering datasets different prefixes (e: query '1: '" in p.by_type["clustering"]
    assert "--prompts=instruct" in p.by_type["clustering"]
    assert ma.TaskPrompts.of(run, "instruct").by_type == {}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random HF Qwen3 saved by transformers, with the demo tokenizer beside it."""
    from hf_helpers import make_hf_qwen3

    d = tmp_path_factory.mktemp("hf")
    make_hf_qwen3(str(d), vocab_size=4096, num_hidden_layers=2)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), d)
    return str(d)


def test_tool_writes_mteb_result_files_per_point(hf_dir, task_dirs, tmp_path, capsys):
    mteb, _, _ = mods()
    tool = load_tool("eval_mteb")
    out = tmp_path / "out"
    tasks = ",".join(task_dirs)
    assert tool.main([f"--model={hf_dir}", f"--tasks={tasks}", "--points=e1:d16,full",
                      f"--output_dir={out}", "--quiet", "--name=org/rand"]) == 0
    summary = json.load(open(out / "summary.json"))
    assert len(summary["rows"]) == 4
    names = {r["model_name"] for r in summary["rows"]}
    assert names == {"org/rand-e1-d16", "org/rand-e2-d64"}  # a random HF dir: no MEL
    # mteb's own cache reads the files back (the leaderboard tooling reads them the same way).
    cache = mteb.ResultCache(cache_path=str(out))
    for row in summary["rows"]:
        assert os.path.isfile(row["result_file"])
        path = os.path.relpath(row["result_file"], out)
        assert path.startswith(os.path.join("results", row["model_name"].replace("/", "__"),
                                            row["revision"]))
        loaded = cache.load_results(models=[row["model_name"]], tasks=[row["task"]])
        [mr] = loaded.model_results
        assert mr.task_results[0].get_score() == pytest.approx(row["main_score"], abs=1e-5)
    table = open(out / "summary.md").read()
    assert "| e1:d16 | org/rand-e1-d16 |" in table and "months_sts" in table
    assert summary["prompts"]["months_retrieval/document"]["prompt"] == ""


def test_load_wraps_a_directory_at_one_point(hf_dir):
    _, ma, _ = mods()
    e = ma.MTEBEncoder.load(hf_dir, "e1:d16")
    meta = e.mteb_model_meta
    assert meta.name == f"mlembed_jax/{os.path.basename(hf_dir)}-e1-d16"
    assert meta.revision.startswith("export-") and meta.embed_dim == 16
    assert (e.rank, e.exit, e.dim) == (None, 1, 16)
    with pytest.raises(ma.MTEBError, match="serves one point"):
        ma.MTEBEncoder.load(hf_dir, "full,d8")


@pytest.mark.parametrize("args, message", [
    (["--tasks=NoSuchTask"], "unknown MTEB task 'NoSuchTask'"),
    (["--benchmark=NoSuchBenchmark"], "unknown MTEB benchmark 'NoSuchBenchmark'"),
    (["--tasks=SciFact"], "cannot load its dataset 'mteb/scifact'"),
    (["--tasks={sts}", "--points=e3"], "exit=3 is not one of the model's MLL exits"),
    (["--tasks={sts}", "--points=q1"], "--points: 'q1' is not a point"),
    (["--tasks={sts}", "--benchmark=MTEB(eng, v2)"], "exactly one of --tasks"),
    (["--tasks=./no/such/dir"], "is not a directory"),
    (["--tasks={sts}", "--output_dir=gs://bucket/x"], "must be a local directory"),
])
def test_tool_bad_input_is_one_error_line(hf_dir, task_dirs, tmp_path, capsys, monkeypatch,
                                          args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the Hub is unreachable
    tool = load_tool("eval_mteb")
    args = [a.format(sts=task_dirs[1]) for a in args]
    out = tmp_path / "out"
    assert tool.main([f"--model={hf_dir}", f"--output_dir={out}", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()  # the output directory it made is taken back


def test_benchmark_is_mtebs_task_list_and_offline_names_the_task_it_cannot_load(
        hf_dir, tmp_path, capsys, monkeypatch):
    """--benchmark takes mteb's own task list for the paper's benchmark (MMTEB: "MTEB(
    Multilingual, v2)" in mteb 2.26.24). Offline, the first task's data cannot be
    downloaded: one error line naming that task and the fix, exit 2, before any encode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mteb, _, mt = mods()
    name = "MTEB(Multilingual, v2)"
    want = [t.metadata.name for t in mteb.get_benchmark(name).tasks]
    assert len(want) == 131  # mteb 2.26.24's MMTEB
    assert [t.metadata.name for t in mt.resolve_tasks("", name)] == want
    assert [t.metadata.name for t in mt.resolve_tasks("", "MMTEB")] == want  # mteb's alias
    out = tmp_path / "out"
    assert load_tool("eval_mteb").main([f"--model={hf_dir}", f"--benchmark={name}",
                                        f"--output_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: task {want[0]} (1 of 131): cannot load its dataset "
                           f"'mteb/{want[0]}'"), line
    assert "HF_HUB_OFFLINE is set" in line and "HF_DATASETS_CACHE" in line, line
    assert not out.exists()


def test_tool_refuses_nan_embeddings_and_writes_no_result_files(hf_dir, task_dirs, tmp_path,
                                                                 capsys):
    """A model whose weights hold NaN (bytes rewritten in its safetensors file): one error
    line, exit 2, and no mteb result file that a leaderboard could pick up."""
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_model"
    shutil.copytree(hf_dir, bad)
    [weights] = [f for f in os.listdir(bad) if f.endswith(".safetensors")]
    tensors = load_file(str(bad / weights))
    name = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(bad / weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert load_tool("eval_mteb").main([f"--model={bad}", f"--tasks={task_dirs[1]}",
                                        f"--output_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "gives NaN/inf" in errors[0], err
    files = [f for _, _, fs in os.walk(out) for f in fs] if out.exists() else []
    assert files == [], files


def test_report_with_mteb_tasks_refuses_a_second_score_and_unknown_tasks(hf_dir, task_dirs,
                                                                        tmp_path, capsys):
    tool = load_tool("matryoshka_report")
    args = [f"--model={hf_dir}", f"--out_dir={tmp_path / 'r'}", "--quiet"]
    assert tool.main(args + [f"--mteb_tasks={task_dirs[1]}", "--heldout"]) == 2
    assert "error: --mteb_tasks replaces --beir_dir/--heldout" in capsys.readouterr().err
    assert tool.main(args + ["--mteb_tasks=NoSuchTask"]) == 2
    assert "error: unknown MTEB task 'NoSuchTask'" in capsys.readouterr().err
    assert tool.main(args + [f"--mteb_tasks={task_dirs[1]}", "--exits=3"]) == 2
    assert "exit=3 is not one of the model's MLL exits" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- trained model


@pytest.mark.integration
def test_export_scored_through_sentence_transformers_equals_the_adapter(names_run, tmp_path):
    """The export of a point, scored by mteb's own sentence-transformers wrapper with the
    same prompts, gives the adapter's numbers at that point (measured: equal to the 5
    digits mteb keeps; 1e-4 leaves a margin for a near-tie flipping)."""
    _, ma, mt = mods()
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from sentence_transformers import SentenceTransformer

    from mlembed_jax.export import export_checkpoint

    work, _ = names_run
    tasks = mt.write_demo_tasks(str(tmp_path / "tasks"), max_queries=120)
    model = enc.load(work)
    ours = ma.MTEBEncoder(model, ma.Point(16, 1, 32))
    got = run_mteb(ours, tasks)
    out = str(tmp_path / "export")
    export_checkpoint(work, out, rank=16, layers=1, dim=32, mode="compat", dtype="fp32")
    # The prompts the adapter used (the manifest's empty retrieval prefixes, the instruction
    # for STS), keyed by task type (mteb accepts only its registry's task names as keys):
    # the wrapper puts them before the texts as the adapter did.
    kind = {"cldr_names_retrieval": "Retrieval", "cldr_names_sts": "STS"}
    prompts = {(f"{kind[t]}-{pt}" if pt else kind[t]): p
               for (t, pt), (p, _) in ours.prompts.used.items()}
    assert prompts == {"Retrieval-query": "", "Retrieval-document": "",
                       "STS": "Instruct: Retrieve semantically similar text.\nQuery:"}
    st = SentenceTransformerEncoderWrapper(SentenceTransformer(out, device="cpu"),
                                           model_prompts=prompts)
    want = run_mteb(st, tasks)
    for name in got:
        assert got[name].get_score() == pytest.approx(want[name].get_score(), abs=1e-4), name
        # Every ranking and cosine metric too. Not the distance ones (euclidean_*,
        # manhattan_*) nor nauc_*_max (raw top scores): sentence-transformers normalises the
        # export's 64-dim vector before truncate_dim cuts it to 32, so its vectors are
        # shorter than 1 (0.7 here) while the adapter's are unit length.
        ours_all, st_all = got[name].scores["test"][0], want[name].scores["test"][0]
        for key, value in ours_all.items():
            if isinstance(value, float) and not key.startswith(("euclidean", "manhattan")) \
                    and not (key.startswith("nauc_") and key.endswith("_max")):
                assert value == pytest.approx(st_all[key], abs=1e-4, nan_ok=True), (name, key)
    assert got["cldr_names_retrieval"].get_score() > 0.1  # a trained model, not noise


@pytest.mark.integration
def test_tool_on_the_demo_tasks_and_the_report(names_run, tmp_path):
    """The README's offline command on the trained run, and matryoshka_report scoring the
    same tasks: a report grid point equals the eval_mteb score at that point."""
    _, _, mt = mods()
    work, _ = names_run
    tasks = mt.write_demo_tasks(str(tmp_path / "tasks"), max_queries=100)
    out = tmp_path / "mteb"
    assert load_tool("eval_mteb").main([f"--model={work}", f"--tasks={','.join(tasks)}",
                                        "--points=r8:e1:d16,full", f"--output_dir={out}",
                                        "--quiet"]) == 0
    rows = json.load(open(out / "summary.json"))["rows"]
    assert {r["model_name"] for r in rows} == {"mlembed_jax/work-r8-e1-d16",
                                               "mlembed_jax/work-r32-e2-d64"}
    assert {r["revision"] for r in rows} == {"step500"}
    report = tmp_path / "report"
    assert load_tool("matryoshka_report").main([
        f"--model={work}", f"--mteb_tasks={','.join(tasks)}", f"--out_dir={report}",
        "--ranks=8,32", "--exits=1,2", "--dims=16,64", "--quiet"]) == 0
    grid = json.load(open(report / "matryoshka.json"))["grid"]
    assert len(grid) == 8
    for r in rows:
        [g] = [x for x in grid if (x["rank"], x["exit"], x["dim"]) == (r["rank"], r["exit"],
                                                                       r["dim"])]
        assert g["mteb"][r["task"]] == pytest.approx(r["main_score"], abs=1e-5)
