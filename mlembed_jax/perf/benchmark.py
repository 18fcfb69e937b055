"""Times the full train step (forward, 3D-ML loss, backward, AdamW) on the benchmark length
mix (perf/benchmark_mix.py), with random weights of a config's shape. The step is the one
`train_step.build_step` builds for training, compiled for each row bucket the mix's steps use
(as training does) before the first timed step; only the data is synthetic.
tools/benchmark.py prints it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from mlembed_jax.batch import BatchGeometry, geometry_from_config, row_buckets, text_lengths
from mlembed_jax.config import ConfigError
from mlembed_jax.model.encoder import init_params
from mlembed_jax.perf import flops as flops_lib
from mlembed_jax.perf.benchmark_mix import MIX_NEGATIVES, benchmark_batches
from mlembed_jax.sharding import make_mesh, to_global_batch
from mlembed_jax.train_step import build_step


@dataclasses.dataclass
class BenchResult:
    name: str
    step_times: list[float]
    useful_tokens: list[int]  # real tokens per timed step
    padded_tokens: list[int]  # token cells per timed step (rows x seq)
    flops: list[float]  # hand-counted train FLOPs per timed step
    peak_memory: int | None  # bytes, where the backend reports it
    devices: int
    device_kind: str

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.useful_tokens) / sum(self.step_times)

    @property
    def padding(self) -> float:
        return 1 - sum(self.useful_tokens) / sum(self.padded_tokens)

    def mfu(self) -> float | None:
        return flops_lib.mfu(sum(self.flops), sum(self.step_times), self.device_kind,
                             self.devices)


def plain_variant(config):
    """The same model trained plainly: no MEL, one exit (the last), no MRL dims."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.mel = False
        c.model.exits = (c.model.num_layers,)
        c.loss.mrl_min_dim = c.model.hidden_size
    return c


def make_batches(config, steps: int, seed: int = 0, packs: int = 1):
    """Host batches of the mix with `packs` packs (one per batch shard), each step at its
    row bucket (data.rows_per_pack, or derived from these steps as the data plan does), with
    their stats. Returns (geometries of the buckets the steps use, [(batch, stats)])."""
    dc = config.data
    base = geometry_from_config(dc, packs, rows=1)  # rows are set per step below
    try:
        buckets, batches = benchmark_batches(
            base, steps, seed, vocab_size=config.model.vocab_size,
            eos_id=min(config.model.eos_token_id, config.model.vocab_size - 1),
            negatives=min(MIX_NEGATIVES, base.max_negatives), mode=dc.packing,
            max_length=int(dc.max_seq_length), rows_per_pack=row_buckets(dc),
            num_shapes=int(dc.num_shapes))
    except ValueError as e:  # buckets too small for the mix: the fix is a config field
        raise ConfigError(str(e)) from None
    used = sorted({s["rows"] for _, s in batches})
    return [geometry_from_config(dc, packs, r) for r in used], batches


def _geometry_of(geometries: list[BatchGeometry], rows: int) -> BatchGeometry:
    return next(g for g in geometries if g.rows_per_pack == rows)


def run_jax(config, batches, geometries, warmup: int, name: str = "mlembed_jax",
            profile_dir: str | None = None) -> BenchResult:
    """Times `len(batches) - warmup` train steps after `warmup` untimed ones; every row
    bucket is compiled first, and run once untimed: the first run of a compiled program
    carries one-off costs (on XLA:CPU about 0.13 s at the tiny config's seq 64, twice its
    step), which a run pays once per bucket, not per step. With `profile_dir`, three more
    steps then run under jax.profiler (outside the timing)."""
    mesh = make_mesh(config.mesh)
    step = build_step(config, mesh, total_steps=max(len(batches), 1), geometries=geometries)
    state = step.init_state()
    # With LoRA the frozen base is random weights too, an argument of every step as in training.
    base = (None if step.setup.lora is None else
            step.place_base(init_params(step.setup.enc, jax.random.key(1))))
    extra = () if base is None else (base,)
    # Batches go to the device before timing: the step is what is measured here.
    device_batches = [to_global_batch(b, _geometry_of(geometries, s["rows"]), mesh, step.rules)
                      for b, s in batches]
    times, tokens, cells, flops = [], [], [], []
    compiled = step.compile_train(state, base_params=base)
    with step.rules_context():
        warm = {st["rows"] for _, st in batches[:warmup]}  # the warm-up steps run these
        for (_, st), batch in zip(batches[warmup:], device_batches[warmup:]):
            if st["rows"] not in warm:
                warm.add(st["rows"])
                state, metrics = compiled[st["rows"]](state, batch, None, *extra)
        jax.block_until_ready(state)
        for i, ((host, st), batch) in enumerate(zip(batches, device_batches)):
            t0 = time.perf_counter()
            state, metrics = compiled[st["rows"]](state, batch, None, *extra)
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            if i >= warmup:
                lengths = text_lengths(host)
                times.append(dt)
                tokens.append(int(lengths.sum()))
                cells.append(int(host["tokens"].size))
                flops.append(flops_lib.train_flops(config.model, lengths))
        if profile_dir:
            try:
                jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
                for (_, st), batch in zip(batches[-3:], device_batches[-3:]):
                    state, metrics = compiled[st["rows"]](state, batch, None, *extra)
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: keep the timings
                print(f"warning: profiling failed, timings stand: {type(e).__name__}: {e}",
                      flush=True)
    loss = float(metrics["total"])
    if not np.isfinite(loss):
        raise RuntimeError(f"benchmark step produced a non-finite loss ({loss})")
    stats = mesh.devices.flat[0].memory_stats() or {}
    return BenchResult(name, times, tokens, cells, flops, stats.get("peak_bytes_in_use"),
                       mesh.devices.size, mesh.devices.flat[0].device_kind)
