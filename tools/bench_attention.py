"""Times each attention kernel on one step's packed rows of the benchmark length mix, and checks
it against the dense fp32 reference on those very rows.

    python tools/bench_attention.py [--kernels=dense,cudnn,tokamax_mosaic] [--seq_len=1024] \
        [--heads=16 --kv_heads=8 --head_dim=128] [--steps=20] [--dtype=bfloat16]

One row per kernel: forward + backward time of one layer (median), useful TFLOP/s (causal
pairs inside each text only, mlembed_jax/perf/flops.py), max |error| of outputs and of gradients vs
the reference (real tokens only), and whether any text saw another (keys and values of one
text are scrambled; every other text must be unchanged). Kernels that cannot run here are
listed with the reason. On CPU it is a smoke run; its timings mean nothing for GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax.batch import BatchGeometry, text_lengths
from mlembed_jax.data.packing import ffd_rows_needed
from mlembed_jax.model import attention
from mlembed_jax.model.kernel_choice import check_platform
from mlembed_jax.perf.benchmark_mix import MIX_NEGATIVES, benchmark_batches, mix_steps
from mlembed_jax.perf.flops import attention_flops, peak_flops


def mix_rows(seq_len: int, rows: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Segment ids [rows, seq_len] of one packed pack of the mix, and its text lengths: the
    most of the recipe's 8 samples (in mix order) whose texts fit `rows` rows."""
    lengths = mix_steps(1, 1, 8, MIX_NEGATIVES, seed, seq_len)[0]  # [8, 9]
    prefixes = np.zeros((8, lengths.size), np.int64)
    for m in range(1, 9):
        prefixes[m - 1, :m * lengths.shape[1]] = lengths[:m].reshape(-1)
    need = ffd_rows_needed(prefixes, seq_len)
    m = int(np.flatnonzero(need <= rows).max()) + 1 if (need <= rows).any() else 0
    if m == 0:
        raise SystemExit(f"--rows={rows}: one sample of the mix needs {int(need[0])} rows")
    geometry = BatchGeometry(1, rows, seq_len, m * (2 + MIX_NEGATIVES), m, MIX_NEGATIVES)
    _, [(batch, _)] = benchmark_batches(geometry, 1, seed, vocab_size=1000, eos_id=1,
                                        rows_per_pack=(rows,), lengths=lengths[None, :m])
    return batch["segment_ids"], [int(n) for n in text_lengths(batch)]


def _grad_fn(fn, seg, cot):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _max_err(a, b, real):
    return float(np.abs(np.asarray(a, np.float32)[real] - np.asarray(b, np.float32)[real]).max())


def bench_kernel(name, q, k, v, seg, steps):
    """-> (median ms of forward + backward, max err out, max err grads, crosses texts)."""
    fn = attention.get_attention(name)
    real = seg > 0
    cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * real[..., None, None],
                      jnp.float32)
    step = _grad_fn(fn, seg, cot)
    jax.block_until_ready(step(q, k, v))  # compile and autotune outside the timing
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - t0)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out = attention.dense_masked_attention(*f32, seg)
    _, want_g = _grad_fn(attention.dense_masked_attention, seg, cot)(*f32)
    out = jax.jit(fn)(q, k, v, seg)
    _, got_g = step(q, k, v)
    err_out = _max_err(out, want_out, real)
    err_g = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                for a, b in zip(got_g, want_g))
    # Scramble keys and values of the first text of the row holding the most texts (so later
    # texts share its row); nothing outside that text may move.
    row = int(np.argmax(np.asarray(seg).max(axis=1)))
    if seg[row].max() < 2:
        raise ValueError("no row holds two texts: the cross-text check needs shorter texts")
    hit = np.asarray(seg[row] == 1)
    k2 = k.at[row, hit].set(50.0)
    v2 = v.at[row, hit].set(-50.0)
    moved = jax.jit(fn)(q, k2, v2, seg)
    others = real & ~((np.arange(seg.shape[0])[:, None] == row) & (seg == 1))
    crosses = _max_err(moved, out, others) > 0
    return 1e3 * statistics.median(times), err_out, err_g, crosses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=None,
                   help="comma-separated names (default: all that can run on this platform)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=19, help="rows of the packed step (the most of 8 "
                   "samples of the mix that fit; 19 x 1024 holds 8 on most steps)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    platform = jax.devices()[0].platform
    names = a.kernels.split(",") if a.kernels else sorted(attention.ATTENTION_IMPLS)
    unknown = sorted(set(names) - set(attention.ATTENTION_IMPLS))
    if unknown:
        print(f"error: unknown kernels {unknown}; choose from {sorted(attention.ATTENTION_IMPLS)}",
              file=sys.stderr)
        return 2
    seg, lengths = mix_rows(a.seq_len, a.rows, a.seed)
    rng = np.random.default_rng(a.seed)
    shape = lambda h: (a.rows, a.seq_len, h, a.head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape(h)), a.dtype)
               for h in (a.heads, a.kv_heads, a.kv_heads))
    flops = attention_flops(a.heads, a.head_dim, lengths)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    print(f"date: {datetime.date.today()}  device: {device.device_kind}  jax {jax.__version__}")
    print(f"{len(lengths)} texts, {sum(lengths):,} tokens in {a.rows} rows x {a.seq_len} "
          f"({100 * (1 - sum(lengths) / seg.size):.1f}% padding); heads {a.heads}/{a.kv_heads}, "
          f"head_dim {a.head_dim}, {a.dtype}; one layer, forward + backward")
    print("| kernel | fwd+bwd (median) | useful TFLOP/s | max err out | max err grads | "
          "text sees another? |")
    print("|---|---|---|---|---|---|")
    failed = False
    for name in names:
        if name == "splash" and platform != "tpu":
            print(f"| {name} | skipped: TPU only (CPU tests run it through Pallas' "
                  "interpreter) | | | | |")
            continue
        try:
            check_platform(name, platform)
        except (ValueError, ImportError) as e:
            print(f"| {name} | skipped: {str(e).split(';')[0]} | | | | |")
            continue
        try:
            ms, e_out, e_g, crosses = bench_kernel(name, q, k, v, seg, a.steps)
        except Exception as e:  # noqa: BLE001 - one broken kernel must not hide the others
            print(f"| {name} | FAILED: {type(e).__name__}: {str(e)[:200]} | | | | |")
            failed = True
            continue
        tflops = flops / (ms / 1e3) / 1e12
        mfu = f" ({100 * tflops * 1e12 / peak:.0f}% of peak)" if peak else ""
        failed |= crosses
        print(f"| {name} | {ms:.2f} ms | {tflops:.3g}{mfu} | {e_out:.2e} | {e_g:.2e} | "
              f"{'**YES**' if crosses else 'no'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
