"""The output of prepare_data: loading it for training, and how a run's texts were made.

`load_prepared` resolves everything once: doc ids -> corpus rows, lengths, and the check
that no text is longer than the packed row (the pipeline fails loudly rather than
truncating). `training_text(config)` is the one answer to "how were this run's texts
tokenised?" (tokenizer directory, EOS, truncation length, manifest with its prefixes) that
encode, export and the evaluation during training all ask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from mlembed_jax import storage
from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data.parquet_io import DataError, negative_columns, read_parquet

FORMAT_VERSION = 1  # of the prepared directory; prepared.json records it


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    """A 16-hex-digit hash of the tokenizer directory's files (names and bytes), which
    prepared.json records so a later run can tell it is given the same tokenizer."""
    h = hashlib.sha256()
    for name in sorted(storage.listdir(tokenizer_dir)):
        p = os.path.join(tokenizer_dir, name)
        if storage.isfile(p):
            h.update(name.encode())
            with storage.open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Corpus:
    tokens: np.ndarray  # [total] int32, memory-mapped (read into memory from a URL)
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


def load_prepared(prepared_dir: str, seq_len: int, manifest_path: str = "",
                  task_types: tuple[str, ...] = ()) -> PreparedData:
    """Reads prepared.json, the corpus arrays and every dataset's query file.

    manifest_path: optional; if given, it must agree with the manifest the data was prepared
    with on datasets and prefixes (prefixes are baked into the tokens), and its num_negatives
    overrides apply.
    task_types: keep only the datasets of these task types (data.task_types; () = all), e.g.
    ("retrieval",) for the paper's first stage. Dataset ids follow the kept datasets' order.
    """
    storage.check_location(prepared_dir, "data.prepared_dir")
    info_path = os.path.join(prepared_dir, "prepared.json")
    info = read_prepared_info(prepared_dir)
    if info is None:
        raise DataError(f"{prepared_dir!r} holds no complete prepared data ({info_path} is "
                        "missing); run tools/prepare_data.py first")
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
    if task_types:
        kept = {n: s for n, s in specs.items() if s.task_type in task_types}
        if not kept:
            raise DataError(f"{prepared_dir}: no dataset has a task type in data.task_types="
                            f"{tuple(task_types)} (task types there: "
                            f"{sorted({s.task_type for s in specs.values()})})")
        specs = kept

    doc_ids = _load_npy(os.path.join(prepared_dir, "corpus_doc_ids.npy"))
    offsets = _load_npy(os.path.join(prepared_dir, "corpus_offsets.npy"))
    tokens = _load_npy(os.path.join(prepared_dir, "corpus_tokens.npy"), mmap=True)
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


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
    """np.load; memory-mapped when asked and local. An object store cannot be mapped: there
    the array is streamed into memory (the corpus tokens: 4 bytes per token)."""
    if not storage.is_url(path):
        return np.load(path, mmap_mode="r" if mmap else None)
    with storage.open(path, "rb") as f:
        return np.load(f)


def _load_dataset(prepared_dir: str, spec, dataset_id: int, corpus: Corpus,
                  seq_len: int) -> PreparedDataset:
    path = os.path.join(prepared_dir, f"{spec.name}_query.parquet")
    if not storage.exists(path):
        raise DataError(f"{path}: query file of dataset {spec.name!r} is missing; re-run "
                        "tools/prepare_data.py")
    table = read_parquet(path)
    if "query_input_ids" not in table.column_names:
        raise DataError(f"{path}: missing column 'query_input_ids'")
    if "passage" not in table.column_names:
        raise DataError(f"{path}: missing column 'passage'")
    cols = ["passage"] + negative_columns(table.column_names, path)
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


# ------------------------------------------------------------------------------------------
# How a run's texts were made.


def read_prepared_info(prepared_dir: str) -> dict | None:
    """prepared.json of a prepared data directory, or None when it is not there."""
    path = os.path.join(prepared_dir, "prepared.json") if prepared_dir else ""
    if not path or not storage.isfile(path):
        return None
    return json.loads(storage.read_text(path))


def find_tokenizer_dir(recorded: str, prepared_dir: str) -> str | None:
    """An existing directory for the tokenizer path prepared.json recorded (as prepare_data
    was given it): as given when absolute; else relative to the current directory, or the
    prepared data directory or any directory above it (so the shipped demo data finds its
    tokenizer wherever the package is installed). Either may be a URL. None when none
    exists: callers then ask for the tokenizer explicitly."""
    if os.path.isabs(recorded) or storage.is_url(recorded):
        return recorded if storage.isdir(recorded) else None
    anchors = [os.getcwd()]
    d = storage.normalized(storage.absolute(prepared_dir)) if prepared_dir else ""
    while d and d not in anchors:
        anchors.append(d)
        parent = os.path.dirname(d)
        d = parent if parent != d else ""
    for a in anchors:
        cand = os.path.join(a, recorded)
        if storage.isdir(cand):
            return storage.absolute(cand)
    return None


@dataclasses.dataclass(frozen=True)
class TrainingText:
    """How a training run's texts were tokenised, from its config and prepared data.

    tokenizer_dir: the tokenizer found on this machine, or None (then `recorded_tokenizer`
    says what prepared.json named, None when the prepared data itself is not here).
    manifest: dataset -> DatasetSpec; prefixes as baked into the prepared tokens, task types
    and negative counts from the run's manifest file when it is here. {} when unknown.
    """

    prepared_dir: str
    tokenizer_dir: str | None
    recorded_tokenizer: str | None
    fingerprint: str | None  # of the tokenizer files prepare_data used
    eos_token_id: int | None  # what prepare_data appended (None: prepared data not here)
    max_seq_length: int
    manifest: dict

    def prefixes(self) -> dict:
        """dataset -> {"query": prefix, "document": prefix}."""
        return {n: {"query": s.query_prefix, "document": s.document_prefix}
                for n, s in self.manifest.items()}

    def tokenizer_not_found(self, fix: str) -> str:
        """The one message for tokenizer_dir None: what was looked for, then `fix` (how the
        caller takes a tokenizer explicitly)."""
        where = (f"records {self.recorded_tokenizer!r}, which is not found here"
                 if self.recorded_tokenizer else "is not here")
        return (f"cannot find the tokenizer the training data was prepared with (prepared "
                f"data {self.prepared_dir!r} {where}); {fix}")


def training_text(config) -> TrainingText:
    """The TrainingText of a run config (a training checkpoint's saved config, or a live
    one). Never raises for missing files: callers decide what they cannot do without."""
    data_cfg = config.data if "data" in config else {}
    prepared_dir = str(data_cfg.get("prepared_dir", "")) if data_cfg else ""
    info = read_prepared_info(prepared_dir)
    recorded = (info or {}).get("tokenizer_dir")
    manifest = {}
    if info is not None and "manifest" in info:
        manifest = manifest_lib.parse_manifest(info["manifest"], source=prepared_dir)
    manifest_path = str(data_cfg.get("manifest", "")) if data_cfg else ""
    if manifest_path and storage.isfile(manifest_path):
        given = manifest_lib.load_manifest(manifest_path)
        # Prefixes are baked into the prepared tokens, so those come from prepared.json; task
        # types and negative counts are what the run's manifest file said (as load_prepared).
        manifest = {n: dataclasses.replace(given[n], query_prefix=s.query_prefix,
                                           document_prefix=s.document_prefix)
                    if n in given else s for n, s in manifest.items()} or given
    default_len = int(data_cfg.get("max_seq_length", 1024)) if data_cfg else 1024
    return TrainingText(
        prepared_dir=prepared_dir,
        tokenizer_dir=find_tokenizer_dir(recorded, prepared_dir) if recorded else None,
        recorded_tokenizer=recorded, fingerprint=(info or {}).get("tokenizer_fingerprint"),
        eos_token_id=int(info["eos_token_id"]) if info and "eos_token_id" in info else None,
        max_seq_length=int((info or {}).get("max_seq_length", default_len)),
        manifest=manifest)

