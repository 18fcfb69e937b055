"""Shared helpers for the data tests: hand-made datasets with recognisable texts."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

from mlembed_jax.config import base_config
from mlembed_jax.data import DEMO_TOKENIZER

TOKENIZER = DEMO_TOKENIZER
WORDS = "alpha beta gamma delta Москва 東京 القاهرة दिल्ली Αθήνα Zürich".split()

# name -> (task type, rows, negative columns)
SMALL = {"ret": ("retrieval", 160, 10), "clu": ("clustering", 120, 9),
         "cls": ("classification", 100, 1)}


def filler(rng: random.Random, n_max: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, n_max)))


def sample_texts(name: str, i: int, negatives: int, seed: int = 0) -> dict:
    """Texts of sample i: the query names the sample so a decoded query identifies it."""
    rng = random.Random(f"{name}-{i}-{seed}")
    row = {"query": f"{name} query {i} {filler(rng, 4)}",
           "passage": f"{name} passage {i} {filler(rng, 6)}"}
    for j in range(1, negatives + 1):
        row[f"negative_{j}"] = f"{name} negative {i}.{j} {filler(rng, 6)}"
    return row


def write_dataset(path: str, name: str, n: int, negatives: int) -> list[dict]:
    rows = [sample_texts(name, i, negatives) for i in range(n)]
    rows[1]["passage"] = "a passage shared by every dataset"  # exercises corpus dedup
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in rows[0]}), path)
    return rows


def make_inputs(root: str, datasets=SMALL, manifest_extra=None) -> tuple[str, str, dict]:
    """Writes raw parquet files + manifest; returns (input_dir, manifest_path, rows)."""
    raw = os.path.join(root, "raw")
    os.makedirs(raw, exist_ok=True)
    rows = {n: write_dataset(os.path.join(raw, f"{n}.parquet"), n, cnt, k)
            for n, (_, cnt, k) in datasets.items()}
    manifest = {n: {"task_type": t} for n, (t, _, _) in datasets.items()}
    manifest.update(manifest_extra or {})
    mpath = os.path.join(root, "manifest.json")
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    return raw, mpath, rows


def data_config(prepared_dir: str, **overrides):
    c = base_config()
    d = c.data
    d.prepared_dir = prepared_dir
    d.seq_len = 64
    d.max_seq_length = 64
    d.samples_per_pack = 4
    d.validation_fraction = 0.1
    # The floor rule: these tests count on at least 8 held-out rows of a dataset (the
    # reference rule is tested in test_reference_data_rules.py).
    d.holdout = "floor"
    d.min_validation_samples = 8
    d.prefetch = 0
    for k, v in overrides.items():
        d[k] = v
    return c
