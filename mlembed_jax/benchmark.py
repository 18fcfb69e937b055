"""Times the full train step (forward, 3D-ML loss, backward, AdamW) on the ANCHORS.md
benchmark length mix, with random weights of a config's shape. tools/benchmark.py prints it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from mlembed_jax import flops as flops_lib
from mlembed_jax.batch import text_lengths
from mlembed_jax.data.benchmark_mix import benchmark_batches, mix_geometry
from mlembed_jax.data.global_batch import to_global_batch
from mlembed_jax.loss import config_kwargs
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.optim import make_optimizer
from mlembed_jax.sharding import activation_rules, make_mesh
from mlembed_jax.state_init import abstract_state, init_state
from mlembed_jax.train_step import StepSetup, jit_steps, state_shardings


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
    """Host batches of the mix for `packs` packs (one per batch shard), with their stats."""
    geometry = mix_geometry(packs=packs, rows_per_pack=int(config.data.rows_per_pack),
                            seq_len=int(config.data.seq_len),
                            samples_per_pack=int(config.data.samples_per_pack),
                            spare_sample_slots=int(config.data.get("spare_sample_slots", 2)),
                            mode=config.data.packing)
    batches = list(benchmark_batches(geometry, steps, seed, vocab_size=config.model.vocab_size,
                                     eos_id=min(config.model.eos_token_id,
                                                config.model.vocab_size - 1),
                                     samples_per_pack=int(config.data.samples_per_pack),
                                     mode=config.data.packing,
                                     max_length=int(config.data.max_seq_length)))
    return geometry, batches


def run_jax(config, batches, geometry, warmup: int, name: str = "mlembed_jax",
            profile_dir: str | None = None) -> BenchResult:
    """Times `len(batches) - warmup` train steps after `warmup` untimed ones. With
    `profile_dir`, three more steps then run under jax.profiler (outside the timing)."""
    mesh = make_mesh(config.mesh)
    rules = config.mesh.logical_axis_rules
    enc = EncoderConfig.from_config(config.model)
    tx, schedule = make_optimizer(config.optim, max(len(batches), 1))
    setup = StepSetup(enc=enc, geometry=geometry, tx=tx, schedule=schedule,
                      loss_kwargs=config_kwargs(config.loss, packs=geometry.packs))
    abstract = abstract_state(setup, 0)
    state_sh = state_shardings(setup, mesh, rules, abstract)
    state = init_state(setup, state_sh, 0)
    train_fn, _ = jit_steps(setup, mesh, state_sh)
    # Batches go to the device before timing: the step is what is measured here.
    device_batches = [to_global_batch(b, geometry, mesh) for b, _ in batches]
    times, tokens, flops = [], [], []
    with activation_rules(mesh, rules):
        compiled = train_fn.lower(state, device_batches[0], None).compile()
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
