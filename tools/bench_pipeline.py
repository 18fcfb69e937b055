"""The data pipeline on synthetic length mixes: coverage, shapes and padding per mix, and
packed tokens per second on one CPU core.

By default it writes one prepared retrieval dataset per length mix (perf/benchmark_mix.py:
short, benchmark, long, max; random token ids, 9 negatives per row of which 7 are drawn) and
runs one epoch of each through the training pipeline at 1, 2 and 4 packs per step (seq_len
1024, 8 samples per pack, row buckets derived from the data): it prints the buckets, the
steps at each, the epoch's coverage and the padding. Then it times --steps steps of the
benchmark mix at --packs packs.

  python tools/bench_pipeline.py [--prepared_dir DIR] [--steps 300] [--packs 1]
      [--mixes short,benchmark,long,max] [--samples 4000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _config(prepared: str, args, packing: str = "ffd"):
    from mlembed_jax.config import base_config

    c = base_config()
    d = c.data
    d.prepared_dir = prepared
    d.seq_len = args.seq_len
    d.max_seq_length = args.seq_len
    d.samples_per_pack = args.samples_per_pack
    d.max_negatives = args.max_negatives
    d.num_shapes = args.num_shapes
    d.packing = packing
    d.prefetch = 0
    d.validation_fraction = 0.0
    c.train.epochs = 1
    return c


def mix_table(args) -> None:
    """One epoch per (mix, packs): coverage, buckets and padding."""
    from mlembed_jax.data.pipeline import make_train_iterator
    from mlembed_jax.perf import benchmark_mix

    print("| mix | packs | row buckets | steps per bucket | coverage | padding |")
    print("|---|---|---|---|---|---|")
    for mix in args.mixes.split(","):
        prepared = tempfile.mkdtemp(prefix=f"{mix}_prepared_")
        benchmark_mix.write_mix_prepared(prepared, samples=args.samples, negatives=9, mix=mix)
        for packs in (1, 2, 4):
            it = make_train_iterator(_config(prepared, args), packs=packs)
            real = cells = 0
            for _ in range(it.steps_per_epoch):
                batch, stats = next(it)
                real += stats["real_tokens"]
                cells += batch["tokens"].size
            end = stats["epoch_end"]
            shapes = ", ".join(f"{r}: {n}" for r, n in end["steps_by_rows"].items())
            print(f"| {mix} | {packs} | {list(it.plan.buckets)} | {shapes} | "
                  f"{end['coverage']:.1%} ({end['samples']}/{end['train_samples']}) | "
                  f"{1 - real / cells:.1%} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared_dir", default="", help="time this instead of a benchmark-mix set")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--packs", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--samples_per_pack", type=int, default=8)
    ap.add_argument("--max_negatives", type=int, default=7)
    ap.add_argument("--num_shapes", type=int, default=3)
    ap.add_argument("--packing", default="ffd", choices=["ffd", "pad_to_longest"])
    ap.add_argument("--mixes", default="short,benchmark,long,max",
                    help="length mixes of the coverage/padding table ('' = skip it)")
    ap.add_argument("--samples", type=int, default=4000, help="rows per mix dataset")
    ap.add_argument("--all_cores", action="store_true", help="do not pin to one core")
    args = ap.parse_args(argv)

    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    # Imported after pinning, so their thread pools start on the one core.
    from mlembed_jax.data.pipeline import make_train_iterator
    from mlembed_jax.perf import benchmark_mix

    if args.mixes and not args.prepared_dir:
        mix_table(args)
    prepared = args.prepared_dir
    if not prepared:
        prepared = tempfile.mkdtemp(prefix="mix_prepared_")
        benchmark_mix.write_mix_prepared(prepared, samples=max(
            4000, args.steps * args.packs * args.samples_per_pack + 100))
    c = _config(prepared, args, args.packing)
    c.train.epochs = 1 + args.steps * args.packs * args.samples_per_pack // 4000
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
    print(f"pipeline ({args.packing}, {args.packs} pack(s) x {list(it.plan.buckets)} rows x "
          f"{args.seq_len}) on {where}: {real / dt:,.0f} packed real tokens/s, "
          f"{cells / dt:,.0f} token cells/s, {args.steps / dt:.1f} steps/s, padding "
          f"{1 - real / cells:.1%}; load and plan {t_load:.2f}s")
    print(it.inner.summary())


if __name__ == "__main__":
    main()
