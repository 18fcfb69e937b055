"""MTEB tasks from local files, for data that is not on the Hugging Face Hub (or offline).

A local task is a directory; its files say what kind of task it is:
  Retrieval  the BEIR layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), read by
             eval/retrieval.load_beir: the same set tools/eval_retrieval.py scores
  STS        test.jsonl: {"sentence1": ..., "sentence2": ..., "score": number} per line
Optional task.json: {"name": ..., "description": ..., "languages": ["eng-Latn", ...],
"min_score": 0, "max_score": 5}. The task's name defaults to the directory's name.
The task's dataset revision is a hash of its files, so results of changed data do not pass
for the old ones.

    python -m mlembed_jax.eval.mteb_tasks --out=tasks/   # the demo's two tasks, from its data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from mlembed_jax import storage
from mlembed_jax.data.jsonl import iter_jsonl
from mlembed_jax.eval import retrieval as rev
from mlembed_jax.eval.mteb_adapter import MTEBError, require_mteb

DEMO_RAW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "demo_data", "raw")
# The CLDR names of the demo are in 18 languages and 8 scripts (demo_data/README.md).
DEMO_LANGS = ["eng-Latn", "deu-Latn", "fra-Latn", "spa-Latn", "ita-Latn", "por-Latn",
              "nld-Latn", "pol-Latn", "swe-Latn", "tur-Latn", "rus-Cyrl", "ukr-Cyrl",
              "ell-Grek", "ara-Arab", "hin-Deva", "zho-Hans", "jpn-Jpan", "kor-Kore"]


def is_local_task(path: str) -> bool:
    """Whether `path` is a directory (a local task) rather than an mteb task name."""
    return os.sep in path or path.startswith(".") or storage.isdir(path)


def _files_revision(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _metadata(path: str, task_type: str, main_score: str, split: str, info: dict):
    from mteb.abstasks.task_metadata import TaskMetadata

    name = info.get("name") or os.path.basename(os.path.normpath(path))
    return TaskMetadata(
        name=name, type=task_type, main_score=main_score,
        description=info.get("description") or f"Local {task_type} task from {path}",
        reference=None, dataset={"path": os.path.abspath(path),
                                 "revision": _files_revision(path)},
        category="t2t", modalities=["text"], eval_splits=[split],
        eval_langs=info.get("languages") or ["eng-Latn"], date=None, domains=None,
        task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation=None)


def local_task(path: str):
    """An mteb AbsTask for the local task directory `path` (see the module docstring)."""
    require_mteb()
    if not storage.isdir(path):
        raise MTEBError(f"local task {path!r} is not a directory")
    info = {}
    info_file = os.path.join(path, "task.json")
    if storage.isfile(info_file):
        try:
            info = json.loads(storage.read_text(info_file))
        except ValueError as e:
            raise MTEBError(f"{info_file}: not JSON ({e})") from None
    if storage.isfile(os.path.join(path, "corpus.jsonl")):
        return _retrieval_task(path, info)
    if storage.isfile(os.path.join(path, "test.jsonl")):
        return _sts_task(path, info)
    raise MTEBError(f"local task {path!r} has neither corpus.jsonl (a BEIR-layout retrieval "
                    "task) nor test.jsonl (an STS task: sentence1, sentence2, score)")


def _retrieval_task(path: str, info: dict):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    qrels_dir = os.path.join(path, "qrels")
    splits = sorted(f[:-4] for f in (storage.listdir(qrels_dir) if storage.isdir(qrels_dir)
                                     else []) if f.endswith(".tsv"))
    split = info.get("split") or ("test" if "test" in splits else (splits or ["test"])[0])
    s = rev.load_beir(path, split)  # errors name the file and line

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _metadata(path, "Retrieval", "ndcg_at_10", split, info)

        def load_data(self, num_proc=None, **kwargs):
            data = RetrievalSplitData(
                queries=Dataset.from_dict({"id": s.query_ids, "text": s.queries}),
                corpus=Dataset.from_dict({"id": s.doc_ids, "text": s.docs,
                                          "title": [""] * len(s.docs)}),
                relevant_docs=s.qrels, top_ranked=None)
            self.dataset = {"default": {split: data}}
            self.data_loaded = True

    return LocalRetrieval()


def read_sts(path: str) -> tuple[list[str], list[str], list[float]]:
    """(sentence1s, sentence2s, scores) of an STS JSONL file; errors name the line."""
    a, b, scores = [], [], []
    for lineno, obj in iter_jsonl(path, MTEBError):
        ok = (isinstance(obj, dict) and isinstance(obj.get("sentence1"), str)
              and isinstance(obj.get("sentence2"), str)
              and isinstance(obj.get("score"), (int, float)))
        if not ok:
            raise MTEBError(f"{path}:{lineno}: expected {{\"sentence1\": str, \"sentence2\": "
                            "str, \"score\": number}")
        a.append(obj["sentence1"])
        b.append(obj["sentence2"])
        scores.append(float(obj["score"]))
    if len(scores) < 2:
        raise MTEBError(f"{path}: an STS task needs at least 2 pairs, found {len(scores)}")
    return a, b, scores


def _sts_task(path: str, info: dict):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    a, b, scores = read_sts(os.path.join(path, "test.jsonl"))

    class LocalSTS(AbsTaskSTS):
        metadata = _metadata(path, "STS", "cosine_spearman", "test", info)
        min_score = info.get("min_score", min(scores))
        max_score = info.get("max_score", max(scores))

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": a, "sentence2": b, "score": scores})})
            self.data_loaded = True

    return LocalSTS()


# --------------------------------------------------------------------------- task lists

def resolve_tasks(tasks: str, benchmark: str) -> list:
    """mteb AbsTask objects for --tasks / --benchmark; MTEBError for unknown names."""
    mteb = require_mteb()
    if bool(tasks) == bool(benchmark):
        raise MTEBError("give exactly one of --tasks=NAME,... or --benchmark=NAME")
    if benchmark:
        try:
            return list(mteb.get_benchmark(benchmark).tasks)
        except KeyError as e:
            raise MTEBError(f"unknown MTEB benchmark {benchmark!r} (mteb "
                               f"{mteb.__version__}): {e.args[0] if e.args else e}; list them "
                               "with python -c \"import mteb; print([b.name for b in "
                               "mteb.get_benchmarks()])\"") from None
    out = []
    for name in (x.strip() for x in tasks.split(",")):
        if not name:
            continue
        if is_local_task(name):
            out.append(local_task(name))
            continue
        try:
            out.extend(mteb.get_tasks(tasks=[name]))
        except KeyError as e:
            why = str(e.args[0] if e.args else e).removeprefix("KeyError: ")
            raise MTEBError(f"unknown MTEB task {name!r} (mteb {mteb.__version__}): {why} "
                               "(a local task is a directory path, e.g. ./tasks/my_task)"
                               ) from None
    if not out:
        raise MTEBError("--tasks is empty")
    return out


def load_task_data(tasks) -> None:
    """Loads every task's data now, so a missing download fails before hours of encoding."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    for i, t in enumerate(tasks, 1):
        try:
            t.load_data()
        except (ConnectionError, OSError) as e:
            ds = t.metadata.dataset or {}
            which = f" ({i} of {len(tasks)})" if len(tasks) > 1 else ""
            fix = ("HF_HUB_OFFLINE is set, so only the local cache is read: unset it and run "
                   "where the Hub is reachable" if offline else "run where the Hub is reachable")
            raise MTEBError(
                f"task {t.metadata.name}{which}: cannot load its dataset {ds.get('path')!r} "
                f"(revision {ds.get('revision')}) from the Hugging Face Hub: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; {fix} once (the "
                "datasets cache, under HF_HOME or HF_DATASETS_CACHE, then serves it offline), "
                "or use a local task directory") from None



# --------------------------------------------------------------------------- the demo's tasks

def write_demo_tasks(out_dir: str, max_queries: int = 300, seed: int = 0) -> list[str]:
    """Writes two local tasks from the demo's cldr_names data (the names the demo model
    trains on: a check of the pipeline, not a held-out measure) and returns their paths:
      cldr_names_retrieval  BEIR layout: a seeded sample of max_queries distinct query
                            names; corpus = their passages and mined negatives; relevant =
                            every passage paired with that name
      cldr_names_sts        each sampled row's (query, passage) pair scored 1 and (query,
                            first negative) scored 0
    """
    import numpy as np
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(DEMO_RAW, "cldr_names.parquet")).to_pylist()
    names = sorted({r["query"] for r in rows})
    rng = np.random.default_rng(seed)
    keep = set(names) if len(names) <= max_queries else {
        names[i] for i in rng.choice(len(names), max_queries, replace=False)}
    rows = [r for r in rows if r["query"] in keep]
    doc_id: dict[str, str] = {}
    for r in rows:
        for k in ["passage"] + sorted((k for k in r if k.startswith("negative_")),
                                      key=lambda k: int(k.split("_")[1])):
            if r[k] is not None and r[k] not in doc_id:
                doc_id[r[k]] = f"d{len(doc_id)}"
    query_id = {q: f"q{i}" for i, q in enumerate(sorted(keep))}
    qrels = sorted({(query_id[r["query"]], doc_id[r["passage"]]) for r in rows})

    ret = os.path.join(out_dir, "cldr_names_retrieval")
    os.makedirs(os.path.join(ret, "qrels"), exist_ok=True)
    with open(os.path.join(ret, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n"
                     for t, i in doc_id.items())
    with open(os.path.join(ret, "queries.jsonl"), "w") as f:
        f.writelines(json.dumps({"_id": i, "text": q}, ensure_ascii=False) + "\n"
                     for q, i in query_id.items())
    with open(os.path.join(ret, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, d in qrels)
    meta = {"languages": DEMO_LANGS, "description": "The demo's CLDR names: find the same "
            "entity named in another language"}
    with open(os.path.join(ret, "task.json"), "w") as f:
        json.dump(meta, f, indent=1)

    sts = os.path.join(out_dir, "cldr_names_sts")
    os.makedirs(sts, exist_ok=True)
    sample = [rows[i] for i in sorted(rng.choice(len(rows), min(len(rows), max_queries),
                                                 replace=False))]
    with open(os.path.join(sts, "test.jsonl"), "w") as f:
        for r in sample:
            for other, score in ((r["passage"], 1), (r["negative_1"], 0)):
                f.write(json.dumps({"sentence1": r["query"], "sentence2": other,
                                    "score": score}, ensure_ascii=False) + "\n")
    with open(os.path.join(sts, "task.json"), "w") as f:
        json.dump({**meta, "description": "The demo's CLDR names: is the second text the "
                   "same entity as the first (1) or another (0)", "min_score": 0,
                   "max_score": 1}, f, indent=1)
    return [ret, sts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the demo's local MTEB tasks.")
    ap.add_argument("--out", required=True, help="directory for the task directories")
    ap.add_argument("--max_queries", type=int, default=300)
    a = ap.parse_args(argv)
    try:
        paths = write_demo_tasks(a.out, a.max_queries)
    except OSError as e:
        print(f"error: cannot write --out {a.out!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    print("wrote " + " and ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
