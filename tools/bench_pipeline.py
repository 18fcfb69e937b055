"""Packed tokens per second of the data pipeline, from prepared parquet, on one CPU core.

By default it writes a prepared dataset following the benchmark length mix (random
token ids, 24 negatives per sample) and packs it as training would: seq_len 1024, 19 rows per
pack, 8 samples + 2 spare slots, 7 negatives (retrieval).

  python tools/bench_pipeline.py [--prepared_dir DIR] [--steps 300] [--packs 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared_dir", default="", help="default: a synthetic benchmark-mix set")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--packs", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--rows_per_pack", type=int, default=19)
    ap.add_argument("--samples_per_pack", type=int, default=8)
    ap.add_argument("--max_negatives", type=int, default=7)
    ap.add_argument("--packing", default="ffd", choices=["ffd", "pad_to_longest"])
    ap.add_argument("--all_cores", action="store_true", help="do not pin to one core")
    args = ap.parse_args(argv)

    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    # Imported after pinning, so their thread pools start on the one core.
    from mlembed_jax.config import base_config
    from mlembed_jax.data.pipeline import make_train_iterator
    from mlembed_jax.perf import benchmark_mix

    prepared = args.prepared_dir
    if not prepared:
        prepared = tempfile.mkdtemp(prefix="mix_prepared_")
        benchmark_mix.write_mix_prepared(prepared, samples=max(
            4000, args.steps * args.packs * args.samples_per_pack + 100))
    c = base_config()
    d = c.data
    d.prepared_dir = prepared
    d.seq_len = args.seq_len
    d.rows_per_pack = args.rows_per_pack
    d.samples_per_pack = args.samples_per_pack
    d.max_negatives = args.max_negatives
    d.packing = args.packing
    d.prefetch = 0
    d.validation_fraction = 0.0
    t0 = time.perf_counter()
    it = make_train_iterator(c, packs=args.packs)
    t_load = time.perf_counter() - t0
    next(it)  # warm caches (epoch order, permutations)
    real = cells = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch, stats = next(it)
        real += stats["real_tokens"]
        cells += batch["tokens"].size
    dt = time.perf_counter() - t0
    where = "1 core" if not args.all_cores else f"{os.cpu_count()} cores"
    print(f"pipeline ({args.packing}, {args.packs} pack(s) x {it.geometry.rows_per_pack} rows x "
          f"{args.seq_len}) on {where}: {real / dt:,.0f} packed real tokens/s, "
          f"{cells / dt:,.0f} token cells/s, {args.steps / dt:.1f} steps/s, padding "
          f"{1 - real / cells:.1%}; load {t_load:.2f}s")
    print(it.inner.summary())


if __name__ == "__main__":
    main()
