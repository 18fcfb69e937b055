"""Loading the output of prepare_data into arrays the pipeline indexes directly.

Everything is resolved once at load: doc ids -> corpus rows, lengths, and the check that no
text is longer than the packed row (the pipeline fails loudly rather than truncating).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data.prepare import FORMAT_VERSION, DataError, negative_columns, read_parquet


@dataclasses.dataclass
class Corpus:
    tokens: np.ndarray  # [total] int32, memory-mapped
    offsets: np.ndarray  # [n_docs + 1] int64
    lengths: np.ndarray  # [n_docs] int32
    doc_ids: np.ndarray  # [n_docs] int64, sorted


@dataclasses.dataclass
class PreparedDataset:
    spec: manifest_lib.DatasetSpec
    dataset_id: int  # index in manifest order
    path: str  # the query file, for error messages
    q_tokens: np.ndarray  # [total] int32
    q_offsets: np.ndarray  # [n + 1] int64
    q_lengths: np.ndarray  # [n] int32
    doc_rows: np.ndarray  # [n, 1 + K] int32 corpus rows: column 0 positive, then negatives

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_rows(self) -> int:
        return len(self.q_lengths)

    @property
    def available_negatives(self) -> int:
        return self.doc_rows.shape[1] - 1


@dataclasses.dataclass
class PreparedData:
    datasets: list[PreparedDataset]  # manifest order
    corpus: Corpus
    info: dict  # prepared.json

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets)


def load_prepared(prepared_dir: str, seq_len: int, manifest_path: str = "") -> PreparedData:
    """Reads prepared.json, the corpus arrays and every dataset's query file.

    manifest_path: optional; if given, it must agree with the manifest the data was prepared
    with on datasets and prefixes (prefixes are baked into the tokens), and its num_negatives
    overrides apply.
    """
    info_path = os.path.join(prepared_dir, "prepared.json")
    if not os.path.exists(info_path):
        raise DataError(f"{prepared_dir!r} holds no complete prepared data ({info_path} is "
                        "missing); run tools/prepare_data.py first")
    with open(info_path) as f:
        info = json.load(f)
    if info.get("version") != FORMAT_VERSION:
        raise DataError(f"{info_path}: format version {info.get('version')} != "
                        f"{FORMAT_VERSION}; re-run tools/prepare_data.py")
    specs = manifest_lib.parse_manifest(info["manifest"], source=info_path)
    if manifest_path:
        given = manifest_lib.load_manifest(manifest_path)
        manifest_lib.check_files_match(given, list(specs), where=f"{prepared_dir} vs "
                                       f"{manifest_path}")
        for name, g in given.items():
            p = specs[name]
            if (g.query_prefix, g.document_prefix) != (p.query_prefix, p.document_prefix):
                raise DataError(f"{manifest_path}: dataset {name!r} has other prefixes than the "
                                f"prepared data in {prepared_dir}; re-run tools/prepare_data.py")
        specs = {n: given[n] for n in specs}  # prepared order; task/negatives from the file

    doc_ids = np.load(os.path.join(prepared_dir, "corpus_doc_ids.npy"))
    offsets = np.load(os.path.join(prepared_dir, "corpus_offsets.npy"))
    tokens = np.load(os.path.join(prepared_dir, "corpus_tokens.npy"), mmap_mode="r")
    lengths = np.diff(offsets).astype(np.int32)
    corpus = Corpus(tokens=tokens, offsets=offsets, lengths=lengths, doc_ids=doc_ids)
    if len(lengths) and lengths.max() > seq_len:
        j = int(np.argmax(lengths))
        raise DataError(f"{prepared_dir}/corpus.parquet: row {j}, column 'input_ids': "
                        f"document of {lengths[j]} tokens exceeds data.seq_len={seq_len}; "
                        "prepare with max_seq_length <= seq_len")

    datasets = [_load_dataset(prepared_dir, spec, i, corpus, seq_len)
                for i, spec in enumerate(specs.values())]
    return PreparedData(datasets=datasets, corpus=corpus, info=info)


def _load_dataset(prepared_dir: str, spec, dataset_id: int, corpus: Corpus,
                  seq_len: int) -> PreparedDataset:
    path = os.path.join(prepared_dir, f"{spec.name}_query.parquet")
    if not os.path.exists(path):
        raise DataError(f"{path}: query file of dataset {spec.name!r} is missing; re-run "
                        "tools/prepare_data.py")
    table = read_parquet(path)
    if "query_input_ids" not in table.column_names:
        raise DataError(f"{path}: missing column 'query_input_ids'")
    if "passage" not in table.column_names:
        raise DataError(f"{path}: missing column 'passage'")
    cols = ["passage"] + negative_columns(table, path)
    q = table.column("query_input_ids").combine_chunks()
    q_offsets = np.asarray(q.offsets, np.int64)
    q_tokens = np.asarray(q.values, np.int32)
    q_offsets = q_offsets - q_offsets[0]
    q_lengths = np.diff(q_offsets).astype(np.int32)
    if len(q_lengths) and q_lengths.min() < 1:
        raise DataError(f"{path}: row {int(np.argmin(q_lengths))}, column 'query_input_ids': "
                        "empty token list")
    if len(q_lengths) and q_lengths.max() > seq_len:
        j = int(np.argmax(q_lengths))
        raise DataError(f"{path}: row {j}, column 'query_input_ids': query of {q_lengths[j]} "
                        f"tokens exceeds data.seq_len={seq_len}")
    doc_rows = np.empty((table.num_rows, len(cols)), np.int32)
    for j, c in enumerate(cols):
        col = table.column(c)
        if col.null_count:
            raise DataError(f"{path}: column {c!r} has null doc ids")
        ids = col.to_numpy()
        rows = np.searchsorted(corpus.doc_ids, ids)
        rows_c = np.minimum(rows, max(len(corpus.doc_ids) - 1, 0))
        bad = np.flatnonzero((rows >= len(corpus.doc_ids)) | (corpus.doc_ids[rows_c] != ids)) \
            if len(corpus.doc_ids) else np.arange(len(ids))
        if len(bad):
            raise DataError(f"{path}: row {int(bad[0])}, column {c!r}: doc id {int(ids[bad[0]])}"
                            f" is absent from the corpus ({len(bad)} such rows); the query file "
                            "and corpus come from different prepare runs? Re-run prepare_data")
        doc_rows[:, j] = rows
    return PreparedDataset(spec=spec, dataset_id=dataset_id, path=path, q_tokens=q_tokens,
                           q_offsets=q_offsets, q_lengths=q_lengths, doc_rows=doc_rows)
