"""Length mixes for benchmarks and coverage tests, as packed batches of synthetic token ids.

The benchmark length mix is what every speed comparison uses (the reference recipe was
measured on it): 8 samples per pack, each a query (length uniform int [12, 64]) plus a
positive and 7 negatives (each int(lognormal(ln 220, 0.7)) clipped to [16, 1023]); lengths
include EOS. Other mixes (`MIXES`) stress the shapes: short texts, long documents (median 500
tokens) and every text at max_seq_length. Steps are dealt, sized and packed by the same data
plan rules as training (data/plan.py), so the padding measured here is what training gets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pyarrow as pa

from mlembed_jax.batch import BatchGeometry
from mlembed_jax.data import packing, plan
from mlembed_jax.data.parquet_io import list_array
from mlembed_jax.data.prepared import FORMAT_VERSION
from mlembed_jax.storage import save_npy_atomic as atomic_save_npy
from mlembed_jax.storage import write_table_atomic as atomic_write_table

QUERY_RANGE = (12, 64)
DOC_MEDIAN, DOC_SIGMA, DOC_CLIP = 220, 0.7, (16, 1023)
MIX_NEGATIVES = 7


@dataclasses.dataclass(frozen=True)
class Mix:
    """Queries uniform in `query_range`; documents int(lognormal(ln median, sigma)) clipped
    to `doc_clip` (median None: every text, queries too, at max_length)."""

    query_range: tuple[int, int]
    median: float | None
    sigma: float
    doc_clip: tuple[int, int]


MIXES = {
    "benchmark": Mix(QUERY_RANGE, DOC_MEDIAN, DOC_SIGMA, DOC_CLIP),
    "short": Mix((4, 16), 24, 0.5, (4, 128)),  # names, titles, short answers
    "long": Mix(QUERY_RANGE, 500, DOC_SIGMA, DOC_CLIP),  # long-document sets (papers, news)
    "max": Mix((1024, 1024), None, 0.0, (1024, 1024)),  # everything at max_seq_length
}


def sample_lengths(rng: np.random.Generator, samples: int, negatives: int = 7,
                   max_length: int | None = None, mix: str = "benchmark") -> np.ndarray:
    """[samples, 2 + negatives] text lengths of a mix: query, positive, negatives.
    `max_length` truncates like prepare_data would (the real mixes have 1024)."""
    mx = MIXES[mix]
    q = rng.integers(mx.query_range[0], mx.query_range[1] + 1, size=(samples, 1))
    if mx.median is None:
        d = np.full((samples, 1 + negatives), mx.doc_clip[1], np.int64)
    else:
        d = rng.lognormal(math.log(mx.median), mx.sigma, size=(samples, 1 + negatives))
        d = np.clip(d.astype(np.int64), *mx.doc_clip)
    out = np.concatenate([q, d], axis=1)
    return out if max_length is None else np.minimum(out, max_length)


def mix_steps(steps: int, packs: int, samples_per_pack: int = 8, negatives: int = 7,
              seed: int = 0, max_length: int | None = None, mix: str = "benchmark"):
    """[steps, packs * samples_per_pack, 2 + negatives] lengths of `steps` full steps."""
    rng = np.random.default_rng(seed)
    G = packs * samples_per_pack
    return sample_lengths(rng, steps * G, negatives, max_length, mix).reshape(steps, G, -1)


def mix_buckets(lengths: np.ndarray, packs: int, samples_per_pack: int, seq_len: int,
                rows_per_pack=(), num_shapes: int = 3):
    """(needs [steps], buckets) of `mix_steps` lengths: the rows each step needs and the row
    buckets (the given ones, or derived as for training)."""
    needs = plan.step_needs(lengths, packs, samples_per_pack, seq_len)
    buckets = tuple(sorted(rows_per_pack)) or plan.choose_buckets(needs, num_shapes)
    if needs.max() > buckets[-1]:
        raise ValueError(f"a step of the benchmark length mix needs {int(needs.max())} rows "
                         f"per pack, more than the largest bucket data.rows_per_pack="
                         f"{buckets[-1]}; pass --config.data.rows_per_pack="
                         f"{int(needs.max())} or more (or () to derive the buckets)")
    return needs, buckets


def benchmark_batches(geometry: BatchGeometry, steps: int, seed: int = 0,
                      vocab_size: int = 151936, eos_id: int = 151645,
                      negatives: int = MIX_NEGATIVES, mode: str = "ffd",
                      max_length: int | None = None, mix: str = "benchmark",
                      rows_per_pack=(), num_shapes: int = 3, lengths=None):
    """(buckets, [(batch, stats)] * steps): `steps` steps of the mix for `geometry`'s packs,
    samples per pack, seq_len and max negatives (its rows_per_pack is replaced per step by
    the smallest of `buckets` that holds the step; ffd only). Every pack gets its
    samples_per_pack samples with `negatives` (<= max_negatives) hard negatives; token ids
    are random in [2, vocab) with EOS last. `lengths` [steps, packs * samples_per_pack,
    2 + negatives] replaces the mix's."""
    P, B, S = geometry.packs, geometry.samples_per_pack, geometry.seq_len
    if lengths is None:
        lengths = mix_steps(steps, P, B, negatives, seed, max_length, mix)
    if mode == "pad_to_longest":
        needs, buckets = np.full(steps, geometry.texts_per_pack), (geometry.texts_per_pack,)
    else:
        needs, buckets = mix_buckets(lengths, P, B, S, rows_per_pack, num_shapes)
    rng = np.random.default_rng([seed, 1])
    out = []
    for step, (lens, need) in enumerate(zip(lengths, needs)):
        R = buckets[int(np.searchsorted(buckets, need))]
        g = dataclasses.replace(geometry, rows_per_pack=R)
        batch = g.empty()
        real, all_lengths = 0, []
        for p, idx in enumerate(plan.deal(lens.sum(axis=1), P, B)):
            rows, offsets = packing.plan_pack(lens[idx], g, mode)
            flat = lens[idx].reshape(-1)
            ids = rng.integers(2, vocab_size, size=int(flat.sum()), dtype=np.int32)
            texts = np.split(ids, np.cumsum(flat)[:-1])
            for t in texts:
                t[-1] = eos_id
            real += packing.fill_pack(batch, p, g, texts, 2 + negatives, rows, offsets,
                                      negatives, 0, True)
            all_lengths += flat.tolist()
        stats = {"step": step, "samples": len(lens), "rows": R,
                 **packing.padding_stats(real, batch["tokens"].size, all_lengths)}
        out.append((batch, stats))
    return buckets, out


def write_mix_prepared(out_dir: str, samples: int = 4000, negatives: int = 24, seed: int = 0,
                       vocab_size: int = 151936, eos_id: int = 151645,
                       mix: str = "benchmark", task_type: str = "retrieval") -> str:
    """Writes a prepared dataset (the prepare_data output format) whose lengths follow `mix`,
    with random token ids: one dataset 'mix' of `samples` rows, each with its own positive
    and `negatives` negatives. Returns out_dir."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    lens = sample_lengths(rng, samples, negatives, mix=mix)
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
            "max_seq_length": 1024, "manifest": {"mix": {"task_type": task_type}},
            "datasets": {}, "corpus_documents": n_docs, "synthetic": f"{mix} length mix"}
    with open(os.path.join(out_dir, "prepared.json"), "w") as f:
        json.dump(info, f)
    return out_dir
