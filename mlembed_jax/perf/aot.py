"""Ahead-of-time compilation of the real train step for hardware we do not have.

`tools/aot_compile.py` is the command line; this module does the work:
  * the target's devices: TPU chips described by libtpu (no TPU attached) or this process's
    fake CPU devices (perf/aot_target.py sets the environment up first);
  * the step: `train_step.build_step`, the very builder `mlembed_jax.train` runs, lowered on
    ShapeDtypeStructs (no weights, no data) and compiled for the target;
  * the report: per-chip memory from `compiled.memory_analysis()`, FLOPs per step counted by
    hand (perf/flops.py; XLA's cost analysis counts a scanned layer body only once), and the
    collectives in the compiled HLO (perf/hlo.py).

Nothing here touches a device: TPU programs are compiled for the described chips only, and
the CPU path only compiles. Memory figures for TPU come from XLA:TPU itself; on fake CPU
devices they come from XLA:CPU and are only indicative of a GPU (other fusion, other
layouts, no cuDNN/Triton kernels).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from importlib import metadata

import jax
import jaxlib
import numpy as np
from jax.experimental import topologies

from mlembed_jax.model.encoder import abstract_params
from mlembed_jax.model.qwen3 import param_count
from mlembed_jax.perf import flops as flops_lib
from mlembed_jax.perf import hlo
from mlembed_jax.perf.aot_target import AotError, Target
from mlembed_jax.perf.benchmark_mix import sample_lengths
from mlembed_jax.sharding import make_mesh, pack_ranges
from mlembed_jax.train_step import BuiltStep, build_step


def _quiet_stderr(fn):
    """Runs fn() with the C-level stderr captured; libtpu prints pages of warnings about the
    missing TPU VM metadata. The capture is replayed only if fn raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            return fn()
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def target_devices(target: Target) -> list:
    """The target's devices: described TPU chips (no runtime) or this process's CPU devices."""
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != target.num_devices:
            raise AotError(f"{len(devices)} CPU devices present but {target.num_devices} asked "
                           "for; XLA_FLAGS was set after JAX started (call "
                           "prepare_environment first)")
        return devices
    name = f"{target.chip}:{target.shape}"
    topo = _quiet_stderr(lambda: topologies.get_topology_desc(name, "tpu"))
    if len(topo.devices) != target.num_devices:
        raise AotError(f"topology {target.spec} has {len(topo.devices)} chips, expected "
                       f"{target.num_devices}")
    return list(topo.devices)


def versions(libtpu: bool = True) -> dict:
    """jax, jaxlib and (for TPU targets) the libtpu release that compiled the step."""
    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    if not libtpu:
        return out
    try:
        out["libtpu"] = metadata.version("libtpu")
    except metadata.PackageNotFoundError:  # the copy under <venv>/libtpu: read its dist-info name
        lib = os.environ.get("TPU_LIBRARY_PATH", "")
        try:
            names = " ".join(os.listdir(os.path.dirname(os.path.dirname(lib))))
        except OSError:
            names = ""
        m = re.search(r"libtpu-(\d[\w.]*)\.dist-info", names)
        out["libtpu"] = m.group(1) if m else "unknown"
    return out


# -------------------------------------------------------------------------------------------
# Building and compiling the real step.


@dataclasses.dataclass
class Built:
    """Everything the report needs besides the compiled executable."""

    step: BuiltStep
    lowered: object
    lower_s: float


def build_lowered(config, devices, num_datasets: int = 1) -> Built:
    """Lowers mlembed_jax.train's train step for `devices`, from the config alone: the mesh
    from config.mesh over the devices, then `train_step.build_step` (the schedule length
    changes no shape, so any will do). A KD teacher (loss.teacher) is read from its HF
    config.json only."""
    mesh = make_mesh(config.mesh, devices)
    step = build_step(config, mesh, total_steps=max(int(config.train.max_steps), 1000),
                      num_datasets=num_datasets)
    t0 = time.time()
    with step.rules_context():
        lowered = step.train.lower(step.abstract_state, step.abstract_batch(),
                                   step.abstract_teacher())
    return Built(step, lowered, time.time() - t0)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shard)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


# -------------------------------------------------------------------------------------------
# Reading the compiled program.


# -------------------------------------------------------------------------------------------
# The report.


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def hand_flops(config, geometry, seed: int = 0) -> dict:
    """Model FLOPs of one step by hand (forward + backward, perf/flops.py):
    full: every packed row one causal text of seq_len (an upper bound of the step's work);
    mix: the step's nominal samples (packs x samples_per_pack, 1 query + positive + 7
    negatives) with the benchmark length mix (perf/benchmark_mix.py), cut at
    max_seq_length."""
    rows = geometry.packs * geometry.rows_per_pack
    full = flops_lib.train_flops(config.model, [geometry.seq_len] * rows)
    samples = geometry.packs * int(config.data.samples_per_pack)
    lengths = sample_lengths(np.random.default_rng(seed), samples, 7,
                             int(config.data.max_seq_length))
    mix = flops_lib.train_flops(config.model, lengths.reshape(-1).tolist())
    return {"full": full, "mix": mix, "mix_tokens": int(lengths.sum()),
            "capacity_tokens": rows * geometry.seq_len}


def report(built: Built, compiled, target: Target, compile_s: float, max_fraction: float,
           out=None) -> bool:
    """Prints the report; returns whether the step fits (True without an HBM figure)."""
    def p(s=""):
        print(s, file=out or sys.stdout, flush=True)

    step = built.step
    c, g, setup = step.config, step.geometry, step.setup
    n_dev = target.num_devices
    v = versions(libtpu=target.platform == "tpu")
    ver = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    p(f"mlembed_jax AOT compile, {time.strftime('%Y-%m-%d')}, {ver}")
    if target.platform == "tpu":
        p(f"target: TPU {target.chip} topology {target.shape} = {n_dev} chips, "
          f"{_gb(target.hbm_bytes)} HBM per chip (compiled by XLA:TPU from libtpu; no TPU "
          "attached)")
    else:
        hbm = f", compared with {_gb(target.hbm_bytes)} per {target.chip.upper()}" \
            if target.hbm_bytes else ""
        p(f"target: GPU-cluster planning, {n_dev} fake CPU devices{hbm}. Compiled by XLA:CPU: "
          "memory figures are ONLY INDICATIVE of a GPU (other fusions, layouts and kernels)")
    mesh = dict(step.mesh.shape)
    p(f"mesh: {' '.join(f'{k}={v}' for k, v in mesh.items())}")
    enc = setup.enc
    params = abstract_params(enc)
    p(f"model: {param_count(params):,} params ({param_count(params, True):,} non-embedding), "
      f"{enc.num_layers} layers, exits {list(enc.exits)}, MEL "
      f"{'r_max ' + str(enc.mel_r_max) if enc.mel else 'off'}, remat {enc.remat}, "
      f"attention {enc.attention}, params {enc.param_dtype}, compute {enc.compute_dtype}")
    nominal = g.packs * int(c.data.samples_per_pack)
    p(f"batch: {g.packs} packs x {c.data.samples_per_pack} samples = {nominal:,} samples/step "
      f"({nominal / n_dev:g} per chip; {g.packs * g.samples_per_pack:,} sample slots with "
      f"spares), {g.max_negatives} negatives max; rows {g.packs} x {g.rows_per_pack} x "
      f"{g.seq_len} = {g.packs * g.rows_per_pack * g.seq_len:,} token slots/step; "
      f"max_seq_length {c.data.max_seq_length}")
    hosts = sorted({d.process_index for d in step.mesh.devices.flat})
    if len(hosts) > 1:
        ranges = pack_ranges(step.mesh, step.rules, g.packs)
        sizes = {b - a for a, b in ranges.values()}
        p(f"hosts: {len(hosts)} processes ({n_dev // len(hosts)} chips each), each building "
          f"{'/'.join(map(str, sorted(sizes)))} pack(s) of every step "
          f"(process 0: packs [{ranges[0][0]}, {ranges[0][1]}))")
    if setup.grad_cache_chunks:
        per = g.packs // (setup.batch_shards * setup.grad_cache_chunks)
        p(f"grad cache: {setup.grad_cache_chunks} chunks of {per} pack(s) per chip; activations "
          "are one chunk's, one extra forward pass per step")
    blk = int(c.loss.in_batch_block_size)
    S = g.packs * g.samples_per_pack
    if blk <= 0:
        how = "all rows at once (loss.in_batch_block_size=0)"
    elif blk >= S:
        how = f"one block (loss.in_batch_block_size={blk} >= {S:,} slots)"
    else:
        how = f"in blocks of {blk} rows spread over all devices (loss.in_batch_block_size)"
    p(f"in-batch negatives: global, over {S:,} sample slots; each device scores its "
      f"{max(S // n_dev, 1)} rows against all {S:,} positives, {how}")
    p(f"compile: lowered in {built.lower_s:.1f} s, compiled in {compile_s:.1f} s")
    p()
    state_b = per_device_bytes(step.abstract_state)
    batch_b = per_device_bytes(step.abstract_batch())
    m = hlo.memory(compiled)
    fits = True
    p("per-chip memory (compiled.memory_analysis):")
    if m is None:
        p("  unavailable on this backend")
    else:
        p(f"  arguments    {_gb(m.argument):>10}  (train state {_gb(state_b)} + batch "
          f"{_gb(batch_b)}, by hand)")
        p(f"  outputs      {_gb(m.output):>10}  ({_gb(m.alias)} of it aliased to the donated "
          "state)")
        p(f"  temporaries  {_gb(m.temp):>10}  (activations, gradients, optimizer update)")
        p(f"  program      {_gb(m.code):>10}")
        line = f"  total        {_gb(m.total):>10}"
        if target.hbm_bytes:
            limit = max_fraction * target.hbm_bytes
            fits = m.total <= limit
            line += (f"  of {_gb(target.hbm_bytes)} HBM ({100 * m.total / target.hbm_bytes:.0f}%)"
                     f"; limit {100 * max_fraction:.0f}% = {_gb(limit)}: "
                     + ("FITS" if fits else "DOES NOT FIT"))
        p(line)
    p()
    hf = hand_flops(c, g)
    p("FLOPs per step (hand count, perf/flops.py: 6 N tokens + causal attention):")
    p(f"  every row one full text: {hf['full']:.3e} ({hf['full'] / n_dev:.3e} per chip; "
      f"{hf['capacity_tokens']:,} tokens)")
    over = hf["mix_tokens"] > hf["capacity_tokens"]
    p(f"  benchmark length mix:    {hf['mix']:.3e} ({hf['mix'] / n_dev:.3e} per chip; "
      f"{hf['mix_tokens']:,} real tokens" + (", more than the rows hold: the pipeline would "
                                             "carry samples over)" if over else ")"))
    if target.peak_flops:
        t_mix = hf["mix"] / n_dev / target.peak_flops
        p(f"  at {target.peak_flops / 1e12:.0f} TFLOP/s per chip: the mix takes >= "
          f"{t_mix:.3g} s/step at 100% MFU, {t_mix / 0.4:.3g} s at 40%")
    cf = hlo.cost_flops(compiled)
    if cf is not None:
        p(f"  XLA cost_analysis: {cf:.3e} per chip. Not used: it counts the scanned layer body "
          f"once, not {enc.num_layers} times")
    p()
    cols = hlo.collectives(compiled.as_text())
    p("collectives in the compiled HLO (static count; 'in loop' ones run once per layer):")
    if not cols:
        p("  none")
    kinds = sorted({x.kind for x in cols})
    for k in kinds:
        xs = [x for x in cols if x.kind == k]
        loop = sum(x.in_loop for x in xs)
        big = max(xs, key=lambda x: x.bytes)
        p(f"  {k:<20} {len(xs):>4} ({loop} in loop)  largest {_gb(big.bytes)}: {big.result}")
    if target.platform == "tpu" and cols:
        p("  (XLA:TPU often expresses FSDP all-gathers as all-reduce of a dynamic-update-slice)")
    p()
    if m is not None and target.hbm_bytes:
        p(f"RESULT: {'fits' if fits else 'does NOT fit'}: {_gb(m.total)} per chip "
          f"of {_gb(target.hbm_bytes)}" + (" (indicative only: XLA:CPU)" if
                                            target.indicative else ""))
    return fits


def is_out_of_memory(err: BaseException) -> bool:
    """Whether a compile error is XLA running out of device memory."""
    text = str(err)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Ran out of memory",
                                   "out of memory", "exceeds the memory"))
