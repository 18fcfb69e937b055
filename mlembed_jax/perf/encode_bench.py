"""Encode speed: our packed encode against sentence-transformers' encode, same model, same
texts (tools/bench_encode.py).

The texts follow the benchmark length mix (benchmark_mix.sample_lengths: per sample a query
of 12-64 tokens and 8 passages of lognormal(ln 220, 0.7) tokens, EOS included), made of real
words: CLDR names from the demo data, cut to the sampled token count with the model's own
tokenizer. sentence-transformers sorts texts by length and pads each batch of `batch_size` to
its longest; we pack several texts per row (data/packing.py plan_batches). The two differ
in the padding each computes on, in attention (a dense kernel scores every pair of a packed
row, across its texts, masked: the price of packing without a flash kernel) and in the
runtimes (torch eager vs one compiled XLA program per shape); `*_layout` counts the first
two.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.parquet as pq

from mlembed_jax.data import DEMO_DATA_DIR
from mlembed_jax.data.packing import plan_batches
from mlembed_jax.perf.benchmark_mix import sample_lengths
from mlembed_jax.perf.flops import non_embedding_params


def word_pool() -> list[str]:
    """The words of every text of the shipped demo data (18 languages, 8 scripts)."""
    raw = os.path.join(DEMO_DATA_DIR, "raw")
    words: set[str] = set()
    for f in sorted(os.listdir(raw)):
        table = pq.read_table(os.path.join(raw, f))
        for col in table.column_names:
            for text in table.column(col).to_pylist():
                words.update(text.split())
    return sorted(words)


def mix_texts(tokenizer, samples: int, seed: int = 0, max_length: int = 1024
              ) -> tuple[list[str], np.ndarray]:
    """Texts of the benchmark length mix: `samples` x (query, positive, 7 negatives).

    Each text is random pool words, cut to the sampled length minus one token (EOS is
    appended when encoding) and decoded; re-tokenising a decoded cut can differ by a token
    or so. Returns (texts, the sampled lengths [n] including EOS).
    """
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(rng, samples, max_length=max_length).reshape(-1)
    pool = word_pool()
    texts = []
    for n in lengths:
        words = [pool[i] for i in rng.integers(0, len(pool), size=int(n) + 8)]
        ids = tokenizer(" ".join(words), add_special_tokens=False,
                        verbose=False)["input_ids"][:int(n) - 1]
        texts.append(tokenizer.decode(ids).strip())
    return texts, lengths


def _layout(lengths: np.ndarray, rows: list[tuple[int, int]], cfg) -> dict:
    """rows: (count, length) of the padded rows a layout computes on. Returns its token cells,
    padding share and forward FLOPs as a dense kernel computes them: 2 N_non_embedding per
    cell, plus QK^T and PV over every (query, key) pair of each row, masked or not."""
    cells = sum(c * s for c, s in rows)
    pairs = sum(c * s * s for c, s in rows)
    flops = (2.0 * non_embedding_params(cfg) * cells
             + cfg.num_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * pairs)
    return {"cells": int(cells), "padding": float(1 - np.sum(lengths) / cells),
            "forward_flops": flops}


def st_layout(lengths: np.ndarray, batch_size: int, cfg) -> dict:
    """sentence-transformers' layout: sorted by length (longest first), each batch padded to
    its longest text."""
    s = np.sort(np.asarray(lengths))[::-1]
    return _layout(s, [(len(s[i:i + batch_size]), int(s[i]))
                       for i in range(0, len(s), batch_size)], cfg)


def packed_layout(lengths: np.ndarray, batch_tokens: int, cfg) -> dict:
    """Our layout (data/packing.py plan_batches)."""
    return _layout(lengths, [(p.num_rows, p.seq_len)
                             for p in plan_batches(lengths, batch_tokens)], cfg)


def time_ours(model, texts: list[str], batch_tokens: int, repeats: int = 1) -> dict:
    """Our encode (fp32 as loaded): the first call (compiles each batch shape), then the
    best of `repeats` timed calls. Returns seconds, texts/s and the embeddings."""
    t0 = time.perf_counter()
    model.encode(texts, batch_tokens=batch_tokens)
    first = time.perf_counter() - t0
    best, emb = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb = model.encode(texts, batch_tokens=batch_tokens)
        best = min(best, time.perf_counter() - t0)
    return {"first_call_s": first, "seconds": best, "texts_per_s": len(texts) / best,
            "embeddings": emb}


def time_st(st_model, texts: list[str], batch_size: int, repeats: int = 1) -> dict:
    """sentence-transformers' encode (normalised, numpy): one small warm-up call, then the
    best of `repeats` timed calls."""
    st_model.encode(texts[:batch_size], batch_size=batch_size, normalize_embeddings=True)
    best, emb = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb = st_model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                              convert_to_numpy=True)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "texts_per_s": len(texts) / best, "embeddings": emb}

