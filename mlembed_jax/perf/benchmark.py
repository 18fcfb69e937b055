"""Times the full train step (forward, 3D-ML loss, backward, AdamW) on the benchmark length
mix (perf/benchmark_mix.py), with random weights of a config's shape. The step is the one
`train_step.build_step` builds for training, at the config's batch geometry; only the data
is synthetic. tools/benchmark.py prints it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from mlembed_jax.batch import geometry_from_config, text_lengths
from mlembed_jax.perf import flops as flops_lib
from mlembed_jax.perf.benchmark_mix import MIX_NEGATIVES, benchmark_batches
from mlembed_jax.sharding import make_mesh, to_global_batch
from mlembed_jax.train_step import build_step


@dataclasses.dataclass
class BenchResult:
    name: str
    step_times: list[float]
    useful_tokens: list[int]  # real tokens per timed step
    padded_tokens: int  # token cells per step (rows x seq)
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
        return 1 - sum(self.useful_tokens) / (self.padded_tokens * len(self.useful_tokens))

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
    """Host batches of the mix at the config's batch geometry with `packs` packs (one per
    batch shard), with their stats."""
    geometry = geometry_from_config(config.data, packs)
    batches = list(benchmark_batches(geometry, steps, seed, vocab_size=config.model.vocab_size,
                                     eos_id=min(config.model.eos_token_id,
                                                config.model.vocab_size - 1),
                                     samples_per_pack=int(config.data.samples_per_pack),
                                     negatives=min(MIX_NEGATIVES, geometry.max_negatives),
                                     mode=config.data.packing,
                                     max_length=int(config.data.max_seq_length)))
    return geometry, batches


def run_jax(config, batches, geometry, warmup: int, name: str = "mlembed_jax",
            profile_dir: str | None = None) -> BenchResult:
    """Times `len(batches) - warmup` train steps after `warmup` untimed ones. With
    `profile_dir`, three more steps then run under jax.profiler (outside the timing)."""
    mesh = make_mesh(config.mesh)
    step = build_step(config, mesh, total_steps=max(len(batches), 1), geometry=geometry)
    state = step.init_state()
    # Batches go to the device before timing: the step is what is measured here.
    device_batches = [to_global_batch(b, geometry, mesh, step.rules) for b, _ in batches]
    times, tokens, flops = [], [], []
    with step.rules_context():
        compiled = step.train.lower(state, device_batches[0], None).compile()
        for i, ((host, _), batch) in enumerate(zip(batches, device_batches)):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, None)
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            if i >= warmup:
                lengths = text_lengths(host)
                times.append(dt)
                tokens.append(int(lengths.sum()))
                flops.append(flops_lib.train_flops(config.model, lengths))
        if profile_dir:
            try:
                jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
                for batch in device_batches[-3:]:
                    state, metrics = compiled(state, batch, None)
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: keep the timings
                print(f"warning: profiling failed, timings stand: {type(e).__name__}: {e}",
                      flush=True)
    loss = float(metrics["total"])
    if not np.isfinite(loss):
        raise RuntimeError(f"benchmark step produced a non-finite loss ({loss})")
    stats = mesh.devices.flat[0].memory_stats() or {}
    return BenchResult(name, times, tokens, geometry.packs * geometry.rows_per_pack
                       * geometry.seq_len, flops, stats.get("peak_bytes_in_use"),
                       mesh.devices.size, mesh.devices.flat[0].device_kind)
