"""Retrieval evaluation: BEIR-layout data, exact blocked search, nDCG@10 / Recall@100 / MRR@10.

Data (the standard BEIR layout, read from a local directory):
  corpus.jsonl    {"_id": ..., "title": ... (optional), "text": ...} per line
  queries.jsonl   {"_id": ..., "text": ...} per line
  qrels/<split>.tsv  query-id <TAB> corpus-id <TAB> score, with or without a header line
A document's text is title + " " + text (stripped), as BEIR's sentence-transformers wrapper
builds it. Or `heldout_sets(config)`: the in-domain set of a run's own held-out split.

Metrics (per query, then the mean over evaluated queries; BEIR's definitions):
  nDCG@10    sum_{i<=10} rel_i / log2(i + 1), divided by the same sum over the ideal order of
             the query's judged docs (gain = the qrels grade, as pytrec_eval uses)
  Recall@100 (relevant docs in the top 100) / (relevant docs), relevant = grade > 0
  MRR@10     1 / rank of the first relevant doc in the top 10, 0 if none
Only queries with at least one relevant doc in the corpus are evaluated. As in BEIR, a doc
whose id equals the query's id is never retrieved for it (ignore_identical_ids).

Search is exact: cosine = dot product of L2-normalised embeddings, computed block by block
(queries x a block of docs, in fp32 at full matmul precision) with a running top-k, so memory
stays at one [query block, doc block] score matrix whatever the corpus size.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax import storage
from mlembed_jax.data.jsonl import iter_jsonl
from mlembed_jax.data.prepared import load_prepared
from mlembed_jax.data.schedule import dataset_splits
from mlembed_jax.embedding import DEFAULT_BATCH_TOKENS


class RetrievalDataError(ValueError):
    """Unusable evaluation data; the message names the file (and line) and the fix."""


@dataclasses.dataclass
class RetrievalSet:
    """One evaluation set. queries/docs are texts (str) or, with tokenized=True, token-id
    arrays (EOS last, prefixes already in). qrels: query id -> doc id -> grade (ints).
    info: counts about the load (qrels rows dropped for unknown ids, etc.)."""

    name: str
    query_ids: list[str]
    queries: list
    doc_ids: list[str]
    docs: list
    qrels: dict[str, dict[str, int]]
    tokenized: bool = False
    info: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- BEIR loading

def read_beir_jsonl(path: str, what: str, need_title: bool = False):
    """Yields (id, text) of a BEIR JSONL file (corpus.jsonl / queries.jsonl); with need_title
    a text is title + " " + text. Errors name the file and the line."""
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path, RetrievalDataError):
        if not isinstance(obj, dict):
            raise RetrievalDataError(f"{path}:{lineno}: expected a JSON object, got "
                                     f"{type(obj).__name__}")
        if "_id" not in obj:
            raise RetrievalDataError(f"{path}:{lineno}: {what} has no '_id' field "
                                     f"(fields: {sorted(obj)})")
        if not isinstance(obj.get("text"), str):
            raise RetrievalDataError(f"{path}:{lineno}: {what} has no string 'text' field "
                                     f"(fields: {sorted(obj)})")
        ident = str(obj["_id"])
        if ident in seen:
            raise RetrievalDataError(f"{path}:{lineno}: duplicate _id {ident!r} (first on "
                                     f"line {seen[ident]})")
        seen[ident] = lineno
        text = obj["text"]
        if need_title:
            title = obj.get("title") or ""
            if not isinstance(title, str):
                raise RetrievalDataError(f"{path}:{lineno}: 'title' is not a string")
            text = (title + " " + text).strip()
        yield ident, text


def read_qrels(path: str) -> list[tuple[str, str, int]]:
    """(query id, doc id, grade) rows of a BEIR qrels TSV; a header line is skipped."""
    rows = []
    with storage.open(path, encoding="utf-8", newline="") as f:
        for lineno, parts in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not parts or all(not p.strip() for p in parts):
                continue
            if len(parts) != 3:
                raise RetrievalDataError(f"{path}:{lineno}: expected 3 tab-separated columns "
                                         f"(query-id, corpus-id, score), got {len(parts)}")
            q, d, s = (p.strip() for p in parts)
            try:
                grade = int(s)
            except ValueError:
                if lineno == 1:  # the header, e.g. "query-id corpus-id score"
                    continue
                raise RetrievalDataError(f"{path}:{lineno}: score {s!r} is not an "
                                         "integer") from None
            rows.append((q, d, grade))
    return rows


def load_beir(path: str, split: str = "test", *, max_queries: int = 0, max_corpus: int = 0,
              seed: int = 0) -> RetrievalSet:
    """A BEIR-layout directory -> RetrievalSet (texts).

    qrels rows naming a query or doc that is not in queries.jsonl / corpus.jsonl are dropped
    and counted in info (qrels_unknown_query_rows, qrels_unknown_doc_rows, with a few
    examples); an empty corpus, no queries, or no usable qrels are errors.
    max_queries > 0 keeps a seeded sample of the judged queries; max_corpus > 0 keeps every
    doc judged for the kept queries plus a seeded sample of the others up to that size (the
    metrics are then those of the smaller corpus, easier than the full one).
    """
    storage.check_location(path, "BEIR directory")
    if not storage.isdir(path):
        raise RetrievalDataError(f"BEIR directory {path!r} does not exist")
    files = {"corpus": os.path.join(path, "corpus.jsonl"),
             "queries": os.path.join(path, "queries.jsonl"),
             "qrels": os.path.join(path, "qrels", f"{split}.tsv")}
    missing = [p for p in files.values() if not storage.isfile(p)]
    if missing:
        raise RetrievalDataError(
            f"{path!r} is not in the BEIR layout: missing {', '.join(missing)} (expected "
            f"corpus.jsonl, queries.jsonl and qrels/{split}.tsv)")
    corpus = dict(read_beir_jsonl(files["corpus"], "document", need_title=True))
    if not corpus:
        raise RetrievalDataError(f"{files['corpus']}: the corpus is empty (no documents)")
    queries = dict(read_beir_jsonl(files["queries"], "query"))
    if not queries:
        raise RetrievalDataError(f"{files['queries']}: no queries")
    rows = read_qrels(files["qrels"])
    qrels, info = _clean_qrels(rows, queries, corpus, files["qrels"])

    query_ids = sorted(qrels)
    rng = np.random.default_rng(seed)
    if 0 < max_queries < len(query_ids):
        pick = np.sort(rng.choice(len(query_ids), max_queries, replace=False))
        query_ids = [query_ids[i] for i in pick]
        qrels = {q: qrels[q] for q in query_ids}
    doc_ids = list(corpus)
    if 0 < max_corpus < len(doc_ids):
        judged = {d for q in query_ids for d in qrels[q]}
        others = [d for d in doc_ids if d not in judged]
        extra = max(0, max_corpus - len(judged))
        keep = set(judged) | {others[i] for i in rng.choice(len(others), min(extra, len(others)),
                                                               replace=False)}
        doc_ids = [d for d in doc_ids if d in keep]
    info.update({"queries": len(query_ids), "corpus": len(doc_ids),
                 "queries_in_file": len(queries), "corpus_in_file": len(corpus)})
    return RetrievalSet(name=os.path.basename(storage.normalized(path)), query_ids=query_ids,
                        queries=[queries[q] for q in query_ids], doc_ids=doc_ids,
                        docs=[corpus[d] for d in doc_ids], qrels=qrels, info=info)


def _clean_qrels(rows, queries, corpus, where):
    """Drops (and counts) rows with unknown ids and queries with nothing relevant."""
    qrels: dict[str, dict[str, int]] = {}
    unknown_q, unknown_d = [], []
    for q, d, g in rows:
        if q not in queries:
            unknown_q.append(q)
        elif d not in corpus:
            unknown_d.append(d)
        else:
            qrels.setdefault(q, {})[d] = g
    no_relevant = [q for q, docs in qrels.items() if not any(g > 0 for g in docs.values())]
    for q in no_relevant:
        del qrels[q]
    info = {"qrels_rows": len(rows),
            "qrels_unknown_query_rows": len(unknown_q),
            "qrels_unknown_doc_rows": len(unknown_d),
            "qrels_unknown_examples": sorted(set(unknown_q))[:3] + sorted(set(unknown_d))[:3],
            "queries_without_relevant": len(no_relevant)}
    if not qrels:
        raise RetrievalDataError(
            f"{where}: no usable judgements: {len(rows)} rows, {len(unknown_q)} name unknown "
            f"queries, {len(unknown_d)} unknown documents, {len(no_relevant)} queries have no "
            "relevant (score > 0) document; check that the qrels belong to this corpus")
    return qrels, info


def describe_load(info: dict) -> str:
    """One line about what loading dropped (empty when nothing was)."""
    parts = []
    if info.get("qrels_unknown_query_rows"):
        parts.append(f"{info['qrels_unknown_query_rows']} qrels rows name unknown queries")
    if info.get("qrels_unknown_doc_rows"):
        parts.append(f"{info['qrels_unknown_doc_rows']} qrels rows name unknown documents")
    if info.get("queries_without_relevant"):
        parts.append(f"{info['queries_without_relevant']} judged queries have no relevant doc")
    if not parts:
        return ""
    ex = info.get("qrels_unknown_examples") or []
    return ("skipped: " + "; ".join(parts)
            + (f" (e.g. {', '.join(map(repr, ex))})" if ex else ""))


# --------------------------------------------------------------------------- held-out split

def heldout_sets(config) -> list[RetrievalSet]:
    """In-domain retrieval sets from a run's own held-out split (data.split_seed).

    For each retrieval dataset of the prepared data: the held-out rows' queries, against a
    corpus of the held-out positives and all their mined negatives (deduplicated); each query's
    one relevant doc is its positive. Token ids come straight from the prepared data, so they
    are exactly what training saw (prefixes included). Ids: "<dataset>/<row>" for queries,
    the corpus doc id for docs.
    """
    dc = config.data
    data = load_prepared(str(dc.prepared_dir), int(dc.seq_len), str(dc.manifest),
                         task_types=tuple(dc.get("task_types", ())))
    corpus = data.corpus
    sets = []
    for ds, (_, val) in zip(data.datasets, dataset_splits(data.datasets, dc)):
        if ds.spec.task_type != "retrieval" or not len(val):
            continue
        doc_rows = ds.doc_rows[val]  # [n, 1 + K]: positive, then negatives
        rows = np.unique(doc_rows.reshape(-1))
        doc_ids = [str(int(corpus.doc_ids[r])) for r in rows]
        docs = [np.asarray(corpus.tokens[corpus.offsets[r]:corpus.offsets[r + 1]], np.int32)
                for r in rows]
        query_ids = [f"{ds.name}/{int(r)}" for r in val]
        queries = [np.asarray(ds.q_tokens[ds.q_offsets[r]:ds.q_offsets[r + 1]], np.int32)
                   for r in val]
        qrels = {q: {str(int(corpus.doc_ids[p])): 1} for q, p in zip(query_ids, doc_rows[:, 0])}
        sets.append(RetrievalSet(
            name=f"{ds.name}_heldout", query_ids=query_ids, queries=queries, doc_ids=doc_ids,
            docs=docs, qrels=qrels, tokenized=True,
            info={"queries": len(query_ids), "corpus": len(doc_ids)}))
    if not sets:
        raise RetrievalDataError(f"{dc.prepared_dir}: no retrieval dataset has held-out rows "
                                 "(data.validation_fraction > 0 and a dataset with task_type "
                                 "retrieval are needed)")
    return sets


def tokenize_set(rset: RetrievalSet, tokenize, query_prefix: str = "",
                 document_prefix: str = "") -> RetrievalSet:
    """A text set -> the same set with token ids (done once, reused across grid points).
    tokenize(texts, prefix) -> token-id arrays, e.g. an encode.Encoder's `tokenize`."""
    if rset.tokenized:
        return rset
    return dataclasses.replace(rset, queries=tokenize(rset.queries, query_prefix),
                               docs=tokenize(rset.docs, document_prefix), tokenized=True)


def cap_queries(s: RetrievalSet, n: int, seed: int) -> RetrievalSet:
    """A seeded sample of n queries of a set (the corpus is kept whole)."""
    if len(s.query_ids) <= n:
        return s
    pick = np.sort(np.random.default_rng(seed).choice(len(s.query_ids), n, replace=False))
    qids = [s.query_ids[i] for i in pick]
    return dataclasses.replace(s, query_ids=qids, queries=[s.queries[i] for i in pick],
                               qrels={q: s.qrels[q] for q in qids})


# --------------------------------------------------------------------------- search

@functools.partial(jax.jit, static_argnames=("k",))
def _search_block(q, d, doc_index, self_index, run_scores, run_index, k):
    """Scores one [Bq, m] x [Bd, m] block and merges it into the running top-k.

    doc_index [Bd] int32: global doc index of each row (-1 = padding); self_index [Bq]: the
    doc index to exclude per query (-1 = none). Running entries come first in the merge, so
    on equal scores the lower doc index wins, as it does inside a block (top_k is stable).
    """
    s = jnp.dot(q, d.T, precision=jax.lax.Precision.HIGHEST)
    bad = (doc_index[None, :] < 0) | (doc_index[None, :] == self_index[:, None])
    s = jnp.where(bad, -jnp.inf, s)
    bs, bi = jax.lax.top_k(s, min(k, d.shape[0]))
    scores = jnp.concatenate([run_scores, bs], axis=1)
    index = jnp.concatenate([run_index, doc_index[bi]], axis=1)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(index, pos, axis=1)


def exact_search(query_emb: np.ndarray, doc_emb: np.ndarray, k: int, *,
                 exclude: np.ndarray | None = None, doc_block: int = 16384,
                 query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (cosine for normalised inputs).

    query_emb [nq, m], doc_emb [nd, m] float32; exclude: [nq] doc index never returned for
    each query (-1 = none). Returns (scores [nq, k'], doc indices [nq, k']) best first,
    k' = min(k, nd); slots with no doc left (all excluded) hold score -inf and index -1.
    """
    query_emb = np.asarray(query_emb, np.float32)
    doc_emb = np.asarray(doc_emb, np.float32)
    nq, nd = len(query_emb), len(doc_emb)
    if nd == 0:
        raise RetrievalDataError("cannot search an empty corpus")
    k = min(int(k), nd)
    exclude = np.full(nq, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
    doc_block = min(doc_block, nd)
    query_block = min(query_block, max(nq, 1))
    n_blocks = math.ceil(nd / doc_block)
    # Pad the corpus to whole blocks (index -1 masks the padding), so every block has the
    # same shape and the search compiles once.
    pad = n_blocks * doc_block - nd
    docs = jnp.asarray(np.concatenate([doc_emb, np.zeros((pad, doc_emb.shape[1]), np.float32)]))
    idx = jnp.asarray(np.concatenate([np.arange(nd, dtype=np.int32), np.full(pad, -1,
                                                                              np.int32)]))
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int32)
    for q0 in range(0, nq, query_block):
        q = query_emb[q0:q0 + query_block]
        ex = exclude[q0:q0 + query_block]
        n = len(q)
        if n < query_block:  # same shape for the last query block too
            q = np.concatenate([q, np.zeros((query_block - n, q.shape[1]), np.float32)])
            ex = np.concatenate([ex, np.full(query_block - n, -1, np.int32)])
        q, ex = jnp.asarray(q), jnp.asarray(ex)
        run_s = jnp.full((query_block, k), -jnp.inf, jnp.float32)
        run_i = jnp.full((query_block, k), -1, jnp.int32)
        for b in range(n_blocks):
            sl = slice(b * doc_block, (b + 1) * doc_block)
            run_s, run_i = _search_block(q, docs[sl], idx[sl], ex, run_s, run_i, k)
        out_s[q0:q0 + n] = np.asarray(run_s)[:n]
        out_i[q0:q0 + n] = np.asarray(run_i)[:n]
    out_i[~np.isfinite(out_s)] = -1
    return out_s, out_i


# --------------------------------------------------------------------------- metrics

def retrieval_metrics(run: dict[str, Sequence[str]], qrels: dict[str, dict[str, int]],
                      ndcg_k: int = 10, recall_k: int = 100, mrr_k: int = 10) -> dict:
    """Mean nDCG@ndcg_k, Recall@recall_k, MRR@mrr_k over the queries of qrels that have a
    relevant (grade > 0) doc. run: query id -> doc ids ranked best first (a query missing
    from run scores 0). Keys: "ndcg@10", "recall@100", "mrr@10", "num_queries"."""
    ndcg, recall, mrr = [], [], []
    for q, judged in qrels.items():
        relevant = {d for d, g in judged.items() if g > 0}
        if not relevant:
            continue
        ranked = list(run.get(q, ()))
        dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:ndcg_k]))
        ideal = sorted(judged.values(), reverse=True)[:ndcg_k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal) if g > 0)
        ndcg.append(dcg / idcg)
        recall.append(len(relevant & set(ranked[:recall_k])) / len(relevant))
        first = next((i for i, d in enumerate(ranked[:mrr_k]) if d in relevant), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
    n = len(ndcg)
    mean = (lambda xs: float(np.mean(xs)) if xs else 0.0)
    return {f"ndcg@{ndcg_k}": mean(ndcg), f"recall@{recall_k}": mean(recall),
            f"mrr@{mrr_k}": mean(mrr), "num_queries": n}


def evaluate_embeddings(rset: RetrievalSet, query_emb: np.ndarray, doc_emb: np.ndarray, *,
                        k: int = 100, ignore_identical_ids: bool = True, **search_kw) -> dict:
    """Metrics of a set given its query [nq, m] and doc [nd, m] embeddings (normalised)."""
    exclude = None
    if ignore_identical_ids:
        pos = {d: i for i, d in enumerate(rset.doc_ids)}
        exclude = np.asarray([pos.get(q, -1) for q in rset.query_ids], np.int32)
    _, idx = exact_search(query_emb, doc_emb, k, exclude=exclude, **search_kw)
    run = {q: [rset.doc_ids[j] for j in row if j >= 0] for q, row in zip(rset.query_ids, idx)}
    return retrieval_metrics(run, rset.qrels)


def evaluate(encoder, rset: RetrievalSet, *, rank=None, exit=None, dim=None,
             query_prefix: str = "", document_prefix: str = "", allow_untrained: bool = False,
             batch_tokens: int | None = None, progress: bool = False, store=None) -> dict:
    """Encodes a set at one (rank, exit, dim) and scores it. Returns the metrics plus
    num_docs and encode/search seconds. store: an embedding_store.EmbeddingStore of this
    encoder at this point; texts already in it are read instead of encoded, new ones added."""
    rank, exit, dim = encoder.check(rank, exit, dim, allow_untrained)
    if not rset.docs:
        raise RetrievalDataError(f"{rset.name}: the corpus is empty (no documents)")
    tok = tokenize_set(rset, encoder.tokenize, query_prefix, document_prefix)
    batch_tokens = batch_tokens or DEFAULT_BATCH_TOKENS
    t0 = time.time()
    if store is not None:
        if store.point != {"rank": rank, "exit": exit, "dim": dim}:
            raise RetrievalDataError(f"the embedding store holds point {store.point}, not "
                                     f"rank={rank}, exit={exit}, dim={dim}")
        q = store.embed(tok.queries, batch_tokens=batch_tokens, progress=progress,
                        desc="queries")
        d = store.embed(tok.docs, batch_tokens=batch_tokens, progress=progress, desc="corpus")
    else:
        kw = dict(rank=rank, exit=exit, dim=dim, allow_untrained=allow_untrained,
                  batch_tokens=batch_tokens, progress=progress)
        q = encoder.encode_ids(tok.queries, desc="queries", **kw)
        d = encoder.encode_ids(tok.docs, desc="corpus", **kw)
    t1 = time.time()
    metrics = evaluate_embeddings(tok, q, d)
    metrics.update(num_docs=len(tok.docs), encode_s=t1 - t0, search_s=time.time() - t1)
    return metrics
