"""The benchmark length mix, as packed batches of synthetic token ids.

The mix every speed comparison uses (the reference recipe was measured on it): a step has 8
samples per pack, each a query (length uniform int [12, 64]) plus a positive and 7 negatives
(each int(lognormal(ln 220, 0.7)) clipped to [16, 1023]); lengths include EOS. Batches go
through the same packing and carry-over rule as the real pipeline, so the padding measured
here is what training gets.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa

from mlembed_jax.batch import BatchGeometry
from mlembed_jax.data import packing
from mlembed_jax.data.prepare import FORMAT_VERSION, atomic_save_npy, atomic_write_table, list_array

QUERY_RANGE = (12, 64)
DOC_MEDIAN, DOC_SIGMA, DOC_CLIP = 220, 0.7, (16, 1023)
MIX_NEGATIVES = 7


def sample_lengths(rng: np.random.Generator, samples: int, negatives: int = 7,
                   max_length: int | None = None) -> np.ndarray:
    """[samples, 2 + negatives] text lengths: query, positive, negatives. `max_length`
    truncates like prepare_data would (only for smoke runs with short rows; the real mix
    has max_seq_length 1024)."""
    q = rng.integers(QUERY_RANGE[0], QUERY_RANGE[1] + 1, size=(samples, 1))
    d = rng.lognormal(math.log(DOC_MEDIAN), DOC_SIGMA, size=(samples, 1 + negatives))
    d = np.clip(d.astype(np.int64), *DOC_CLIP)
    out = np.concatenate([q, d], axis=1)
    return out if max_length is None else np.minimum(out, max_length)


def benchmark_batches(geometry: BatchGeometry, steps: int, seed: int = 0,
                      vocab_size: int = 151936, eos_id: int = 151645,
                      samples_per_pack: int = 8, negatives: int = MIX_NEGATIVES,
                      mode: str = "ffd", max_length: int | None = None):
    """Yields `steps` (batch, stats) of the mix: every pack gets `samples_per_pack` new
    samples per step plus its carry-over, each with `negatives` (<= the geometry's
    max_negatives) hard negatives. Token ids are random in [2, vocab) with EOS last."""
    rng = np.random.default_rng(seed)
    N = negatives
    carry = [np.zeros((0, 2 + N), np.int64) for _ in range(geometry.packs)]
    for step in range(steps):
        batch = geometry.empty()
        real, lengths, samples, deferred = 0, [], 0, 0
        for p in range(geometry.packs):
            lens = np.concatenate([carry[p], sample_lengths(rng, samples_per_pack, N, max_length)])
            m, r, o = packing.plan_pack(lens, geometry, mode)
            carry[p] = lens[m:]
            deferred += len(lens) - m
            flat = lens[:m].reshape(-1)
            ids = rng.integers(2, vocab_size, size=int(flat.sum()), dtype=np.int32)
            texts = np.split(ids, np.cumsum(flat)[:-1]) if len(flat) else []
            for t in texts:
                t[-1] = eos_id
            real += packing.fill_pack(batch, p, geometry, texts, 2 + N, r, o, N, 0, True)
            lengths += flat.tolist()
            samples += m
        stats = {"step": step, "samples": samples, "carried_over": deferred,
                 "carry_backlog": int(sum(len(c) for c in carry)),
                 **packing.padding_stats(real, batch["tokens"].size, lengths)}
        yield batch, stats


def write_mix_prepared(out_dir: str, samples: int = 4000, negatives: int = 24, seed: int = 0,
                       vocab_size: int = 151936, eos_id: int = 151645) -> str:
    """Writes a prepared dataset (the prepare_data output format) whose lengths follow the
    mix, with random token ids: one retrieval dataset 'mix' of `samples` rows, each with its
    own positive and `negatives` negatives. Returns out_dir."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    lens = sample_lengths(rng, samples, negatives)
    n_docs = samples * (1 + negatives)
    doc_lens = lens[:, 1:].reshape(-1)
    offsets = np.zeros(n_docs + 1, np.int64)
    np.cumsum(doc_lens, out=offsets[1:])
    tokens = rng.integers(2, vocab_size, size=int(offsets[-1]), dtype=np.int32)
    tokens[offsets[1:] - 1] = eos_id
    atomic_save_npy(tokens, os.path.join(out_dir, "corpus_tokens.npy"))
    atomic_save_npy(offsets, os.path.join(out_dir, "corpus_offsets.npy"))
    atomic_save_npy(np.arange(n_docs, dtype=np.int64), os.path.join(out_dir,
                                                                    "corpus_doc_ids.npy"))
    queries = [np.append(rng.integers(2, vocab_size, n - 1), eos_id).astype(np.int32)
               for n in lens[:, 0]]
    ids = np.arange(n_docs, dtype=np.int64).reshape(samples, 1 + negatives)
    table = pa.table({"query_input_ids": list_array(queries), "passage": pa.array(ids[:, 0]),
                      **{f"negative_{j}": pa.array(ids[:, j]) for j in range(1, 1 + negatives)}})
    atomic_write_table(table, os.path.join(out_dir, "mix_query.parquet"))
    info = {"version": FORMAT_VERSION, "eos_token_id": eos_id, "vocab_size": vocab_size,
            "max_seq_length": 1024, "manifest": {"mix": {"task_type": "retrieval"}},
            "datasets": {}, "corpus_documents": n_docs, "synthetic": "benchmark length mix"}
    with open(os.path.join(out_dir, "prepared.json"), "w") as f:
        json.dump(info, f)
    return out_dir
