"""Tokenise the recipe's parquet datasets into the prepared form the pipeline reads.

Input: `<input_dir>/<name>.parquet` per dataset with columns query, passage,
negative_1 .. negative_K (K >= 1), and a manifest (see manifest.py). As the recipe does, a
dataset above `max_rows_per_dataset` rows (80,000) keeps a seeded random sample of that many
(`sample_rows`; the kept rows stay in file order), and a classification dataset keeps only
negative_1, the one negative it trains with.

Output (`<output_dir>/`):
  <name>_query.parquet   query_input_ids list<int32>, passage int64, negative_1..K int64
                         (doc ids into the corpus), one row per input row, same order.
  <name>_docs.parquet    this dataset's unique documents (doc_id, input_ids): a shard.
  <name>.done            JSON completion marker: fingerprint + stats (written last).
  corpus.parquet         (doc_id int64, input_ids list<int32>) over all datasets, deduplicated,
                         sorted by doc_id.
  corpus_tokens.npy, corpus_offsets.npy, corpus_doc_ids.npy
                         the same corpus as flat arrays, for memory-mapped random access.
  prepared.json          manifest, tokenizer facts and per-dataset stats (written last).

A doc id is a 63-bit hash of the document text (with its prefix), so datasets prepared in
separate runs share ids without rewriting each other; collisions are detected at assembly.
Every file is written to a temporary name and renamed, so a killed run never leaves a
complete-looking half file; a dataset counts as done only once its marker exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from mlembed_jax import storage
from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data import text_encoding
from mlembed_jax.data.parquet_io import (
    DataError,
    check_text_column,
    list_array,
    negative_columns,
    read_parquet,
)
from mlembed_jax.data.prepared import FORMAT_VERSION, tokenizer_fingerprint
from mlembed_jax.data.schedule import name_key

MAX_ROWS_PER_DATASET = 80_000  # the recipe's cap per dataset


def sample_rows(num_rows: int, max_rows: int, seed: int, name: str) -> np.ndarray | None:
    """The rows a dataset keeps: None (all of them) when max_rows <= 0 or num_rows <=
    max_rows, else a seeded random sample of max_rows row indices, sorted. Depends only on
    (num_rows, max_rows, seed, name), so every run and machine keeps the same rows."""
    if max_rows <= 0 or num_rows <= max_rows:
        return None
    rng = np.random.default_rng([seed, name_key(name), 0xCA9])
    return np.sort(rng.choice(num_rows, size=max_rows, replace=False))


def doc_id_of(text: str) -> int:
    """63-bit content hash: stable across runs and machines."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------- encoding
_WORKER_TOK = None


def _worker_init(tokenizer_json: str, max_len: int, eos: int):
    global _WORKER_TOK
    from tokenizers import Tokenizer  # in the spawned worker, which needs nothing else

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    _WORKER_TOK = (tok, max_len, eos)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    tok, max_len, eos = _WORKER_TOK
    return text_encoding.truncate_then_eos(
        (enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)), max_len, eos)


class TokenizerPool:
    """Encodes text lists on all cores (a process pool over the fast tokenizer's backend)."""

    def __init__(self, tokenizer, max_seq_length: int, workers: int):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.workers = max(1, workers)
        self._pool = None
        if self.workers > 1 and getattr(tokenizer, "is_fast", False):
            # spawn: the parent may hold jax/XLA threads, which fork would copy half-way.
            ctx = mp.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_worker_init, initargs=(
                tokenizer.backend_tokenizer.to_str(), max_seq_length, tokenizer.eos_token_id))

    def encode(self, texts: list[str], desc: str) -> list[np.ndarray]:
        chunk = 2048
        chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
        out: list[np.ndarray] = []
        with tqdm(total=len(texts), desc=desc, unit="text", file=sys.stderr,
                  disable=len(texts) < 5000) as bar:
            if self._pool is None:
                results = (text_encoding.encode_texts(self.tokenizer, c, self.max_seq_length)
                           for c in chunks)
            else:
                results = self._pool.imap(_worker_encode, chunks)
            for res in results:
                out.extend(res)
                bar.update(len(res))
        return out

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"count": 0}
    q = np.percentile(lengths, [50, 90, 99])
    return {"count": int(len(lengths)), "tokens": int(lengths.sum()),
            "min": int(lengths.min()), "p50": float(q[0]), "p90": float(q[1]),
            "p99": float(q[2]), "max": int(lengths.max())}


# ----------------------------------------------------------------------------- main entry
@dataclasses.dataclass
class PrepareResult:
    output_dir: str
    datasets: dict  # name -> stats dict
    skipped: list  # names already done before this run
    corpus_docs: int
    max_rows_per_dataset: int = 0
    sample_seed: int = 0


def prepare_dataset(path: str, spec: manifest_lib.DatasetSpec, encoder: TokenizerPool,
                    out_dir: str, fingerprint: dict, max_rows: int = 0,
                    sample_seed: int = 0) -> dict:
    """Tokenises one dataset (its `sample_rows` only); writes its query file, doc shard and
    marker. Returns stats."""
    table = read_parquet(path)
    if table.num_rows == 0:
        raise DataError(f"{path}: the dataset has no rows")
    neg_cols = negative_columns(table.column_names, path)
    input_negatives = len(neg_cols)
    if spec.task_type == "classification":
        neg_cols = neg_cols[:1]  # the recipe's classification negative: always negative_1
    queries = check_text_column(table, "query", path)
    doc_cols = ["passage"] + neg_cols
    columns = {c: check_text_column(table, c, path) for c in doc_cols}
    if len(neg_cols) < spec.num_negatives:  # training would sample fewer than the task's count
        raise DataError(
            f"{path}: {len(neg_cols)} negative column(s) (negative_1..negative_{len(neg_cols)}),"
            f" fewer than the {spec.num_negatives} hard negatives a {spec.task_type} dataset "
            f'samples; add negative columns, or add "num_negatives": {len(neg_cols)} to '
            f"{spec.name!r} in the manifest to train with {len(neg_cols)}")
    keep = sample_rows(table.num_rows, max_rows, sample_seed, spec.name)
    if keep is not None:
        queries = [queries[i] for i in keep]
        columns = {c: [v[i] for i in keep] for c, v in columns.items()}
    num_rows = len(queries)

    # Deduplicate documents within the dataset; ids are content hashes of prefixed text.
    doc_index: dict[str, int] = {}
    unique_docs: list[str] = []
    id_columns = {}
    for c in doc_cols:
        ids = np.empty(num_rows, np.int64)
        for i, text in enumerate(columns[c]):
            full = spec.document_prefix + text
            if full not in doc_index:
                doc_index[full] = doc_id_of(full)
                unique_docs.append(full)
            ids[i] = doc_index[full]
        id_columns[c] = ids

    q_ids = encoder.encode([spec.query_prefix + q for q in queries], f"{spec.name} queries")
    d_ids = encoder.encode(unique_docs, f"{spec.name} documents")
    trunc_at = encoder.max_seq_length

    query_table = pa.table({"query_input_ids": list_array(q_ids),
                            **{c: pa.array(id_columns[c]) for c in doc_cols}})
    doc_table = pa.table({"doc_id": pa.array([doc_index[t] for t in unique_docs], pa.int64()),
                          "input_ids": list_array(d_ids)})
    q_len = np.fromiter((len(a) for a in q_ids), np.int64, len(q_ids))
    d_len = np.fromiter((len(a) for a in d_ids), np.int64, len(d_ids))
    stats = {
        "samples": num_rows,
        "input_rows": table.num_rows,  # before the max_rows_per_dataset sample
        "negative_columns": len(neg_cols),
        "input_negative_columns": input_negatives,
        "unique_documents": len(unique_docs),
        "query_lengths": _length_stats(q_len),
        "document_lengths": _length_stats(d_len),
        "truncated_queries": int((q_len >= trunc_at).sum()),
        "truncated_documents": int((d_len >= trunc_at).sum()),
    }
    storage.write_table_atomic(query_table, os.path.join(out_dir, f"{spec.name}_query.parquet"))
    storage.write_table_atomic(doc_table, os.path.join(out_dir, f"{spec.name}_docs.parquet"))
    marker = {"fingerprint": fingerprint, "stats": stats}
    storage.write_bytes_atomic(json.dumps(marker, indent=1).encode(),
                       os.path.join(out_dir, f"{spec.name}.done"))
    return stats


def assemble_corpus(out_dir: str, names: list[str]) -> int:
    """Merges the per-dataset doc shards into corpus.parquet + flat arrays. Returns #docs."""
    tables = [read_parquet(os.path.join(out_dir, f"{n}_docs.parquet")) for n in names]
    table = pa.concat_tables(tables)
    ids = table.column("doc_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    ids_sorted = ids[order]
    keep = np.ones(len(ids_sorted), bool)
    keep[1:] = ids_sorted[1:] != ids_sorted[:-1]
    input_ids = table.column("input_ids").combine_chunks()
    lists = input_ids.take(pa.array(order))
    # Same id twice must mean the same text; different tokens would be a hash collision.
    dup = np.flatnonzero(~keep)
    for j in dup:
        if lists[int(j)] != lists[int(j) - 1]:
            raise DataError(f"doc id hash collision for doc_id {int(ids_sorted[j])}: two "
                            "different documents share it; change one text slightly")
    sel = pa.array(np.flatnonzero(keep))
    corpus = pa.table({"doc_id": pa.array(ids_sorted[keep]), "input_ids": lists.take(sel)})
    storage.write_table_atomic(corpus, os.path.join(out_dir, "corpus.parquet"))
    flat = corpus.column("input_ids").combine_chunks()
    offsets = np.asarray(flat.offsets, dtype=np.int64)
    tokens = np.asarray(flat.values, dtype=np.int32)
    storage.save_npy_atomic(tokens, os.path.join(out_dir, "corpus_tokens.npy"))
    storage.save_npy_atomic(offsets - offsets[0], os.path.join(out_dir, "corpus_offsets.npy"))
    storage.save_npy_atomic(ids_sorted[keep], os.path.join(out_dir, "corpus_doc_ids.npy"))
    return corpus.num_rows


def check_max_seq_length(max_seq_length: int) -> None:
    """DataError unless every text can keep at least one token before its EOS."""
    problem = text_encoding.max_seq_length_problem(max_seq_length, "--max_seq_length")
    if problem:
        raise DataError(problem)


def prepare_data(input_dir: str, manifest_path: str, tokenizer_dir: str, output_dir: str,
                 max_seq_length: int = 1024, workers: int | None = None,
                 verbose: bool = True, max_rows_per_dataset: int = MAX_ROWS_PER_DATASET,
                 sample_seed: int = 0) -> PrepareResult:
    """Prepares every dataset of the manifest found in input_dir; skips finished ones.
    max_rows_per_dataset: the cap (a seeded sample by sample_seed; <= 0 keeps every row)."""
    check_max_seq_length(max_seq_length)
    specs = manifest_lib.load_manifest(manifest_path)
    storage.check_location(input_dir, "--input_dir")
    if not storage.isdir(input_dir):
        raise DataError(f"input directory {input_dir!r} does not exist")
    files = {f[: -len(".parquet")]: os.path.join(input_dir, f)
             for f in sorted(storage.listdir(input_dir)) if f.endswith(".parquet")}
    manifest_lib.check_files_match(specs, list(files), where=input_dir)
    tokenizer = text_encoding.load_tokenizer(tokenizer_dir)
    storage.makedirs(output_dir)
    tok_fp = tokenizer_fingerprint(tokenizer_dir)

    encoder = None
    stats, skipped = {}, []
    t0 = time.time()
    try:
        for name, spec in specs.items():
            path = files[name]
            size, mtime_ns = storage.size_and_version(path)
            fingerprint = {"version": FORMAT_VERSION, "tokenizer": tok_fp,
                           "max_seq_length": max_seq_length, "spec": spec.to_json(),
                           "input_size": size, "input_mtime_ns": mtime_ns,
                           "max_rows": max_rows_per_dataset, "sample_seed": sample_seed}
            marker = os.path.join(output_dir, f"{name}.done")
            if storage.exists(marker):
                done = json.loads(storage.read_text(marker))
                if done.get("fingerprint") == fingerprint:
                    stats[name] = done["stats"]
                    skipped.append(name)
                    continue
                storage.remove(marker)  # inputs or settings changed: redo this dataset
            if encoder is None:
                encoder = TokenizerPool(tokenizer, max_seq_length,
                                  os.cpu_count() if workers is None else workers)
            stats[name] = prepare_dataset(path, spec, encoder, output_dir, fingerprint,
                                          max_rows_per_dataset, sample_seed)
    finally:
        if encoder is not None:
            encoder.close()

    names = list(specs)
    info_path = os.path.join(output_dir, "prepared.json")
    info = {"version": FORMAT_VERSION, "tokenizer_dir": tokenizer_dir,
            "tokenizer_fingerprint": tok_fp, "eos_token_id": int(tokenizer.eos_token_id),
            "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer),
            "max_seq_length": max_seq_length,
            "max_rows_per_dataset": max_rows_per_dataset, "sample_seed": sample_seed,
            "manifest": {n: specs[n].to_json() for n in names}, "datasets": stats}
    old = None
    if storage.exists(info_path):
        old = json.loads(storage.read_text(info_path))
    if len(skipped) == len(names) and old is not None and {
            k: v for k, v in old.items() if k != "corpus_documents"} == info:
        corpus_docs = old["corpus_documents"]
    else:
        if storage.exists(info_path):
            storage.remove(info_path)  # the corpus is about to change: not complete until rewritten
        corpus_docs = assemble_corpus(output_dir, names)
        info["corpus_documents"] = corpus_docs
        storage.write_bytes_atomic(json.dumps(info, indent=1).encode(), info_path)
    result = PrepareResult(output_dir, stats, skipped, corpus_docs, max_rows_per_dataset,
                           sample_seed)
    if verbose:
        print(format_summary(result, time.time() - t0))
    return result


def format_summary(result: PrepareResult, seconds: float) -> str:
    lines = [f"prepared {len(result.datasets)} dataset(s) into {result.output_dir} in "
             f"{seconds:.1f}s ({len(result.skipped)} already done, skipped); corpus: "
             f"{result.corpus_docs} unique documents"]
    head = (f"{'dataset':<28}{'samples':>9}{'q tokens':>10}{'q p50/p90/max':>16}"
            f"{'docs':>8}{'d tokens':>11}{'d p50/p90/max':>17}{'trunc q/d':>11}")
    lines.append(head)
    tot_s = tot_t = 0
    for name, s in result.datasets.items():
        q, d = s["query_lengths"], s["document_lengths"]
        q_dist = f"{q['p50']:.0f}/{q['p90']:.0f}/{q['max']}"
        d_dist = f"{d['p50']:.0f}/{d['p90']:.0f}/{d['max']}"
        trunc = f"{s['truncated_queries']}/{s['truncated_documents']}"
        lines.append(f"{name:<28}{s['samples']:>9}{q['tokens']:>10}{q_dist:>16}"
                     f"{s['unique_documents']:>8}{d['tokens']:>11}{d_dist:>17}{trunc:>11}")
        tot_s += s["samples"]
        tot_t += q["tokens"] + d["tokens"]
    lines.append(f"total: {tot_s} samples, {tot_t} tokens (documents counted once per dataset)")
    capped = {n: s for n, s in result.datasets.items()
              if s.get("input_rows", s["samples"]) > s["samples"]}
    if capped:
        lines.append(f"{len(capped)} dataset(s) above max_rows_per_dataset="
                     f"{result.max_rows_per_dataset} kept a seeded sample (sample_seed="
                     f"{result.sample_seed}): " + ", ".join(
                         f"{n} {s['samples']} of {s['input_rows']}" for n, s in capped.items()))
    return "\n".join(lines)
