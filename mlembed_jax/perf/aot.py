"""Ahead-of-time compilation of the real train step for hardware we do not have.

`tools/aot_compile.py` is the command line; this module does the work:
  * the target's devices: TPU chips described by libtpu (no TPU attached; one slice or
    several joined by DCN), NVIDIA GPUs described by JAX's CUDA plugin (perf/gpu_aot.py,
    one node or several) or this process's fake CPU devices (perf/aot_target.py sets the
    environment up first);
  * the step: the attention kernel a run there would choose, then `train_step.build_step`,
    the very builder `mlembed_jax.train` runs, lowered on ShapeDtypeStructs (no weights, no
    data) at its largest row bucket (the shape whose memory a run must have) and compiled
    for the target. The buckets are data.rows_per_pack, or, when those are derived from the
    data (()), derived the same way from the benchmark length mix (`mix_geometries`);
  * the report: per-chip memory from `compiled.memory_analysis()`, FLOPs per step counted by
    hand (perf/flops.py; XLA's cost analysis counts a scanned layer body only once), the
    collectives in the compiled HLO and, across slices, those that cross DCN (perf/hlo.py).

Nothing here touches a device: TPU programs are compiled for the described chips only, and
the CPU path only compiles. Memory figures for TPU come from XLA:TPU itself, for GPUs from
XLA:GPU; on fake CPU devices they come from XLA:CPU and are only indicative of a GPU (other
fusion, other layouts, no cuDNN/Triton kernels).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import jax
import jaxlib
import numpy as np
from jax.experimental import topologies

from mlembed_jax.attention_choice import resolve_attention
from mlembed_jax.batch import geometry_from_config, row_buckets
from mlembed_jax.model.encoder import abstract_params
from mlembed_jax.model.kernel_choice import Choice
from mlembed_jax.model.qwen3 import param_count
from mlembed_jax.perf import flops as flops_lib
from mlembed_jax.perf import gpu_aot, hlo
from mlembed_jax.perf.aot_target import AotError, Target, check_libtpu, libtpu_version
from mlembed_jax.perf.benchmark_mix import MIX_NEGATIVES, mix_buckets, mix_steps, sample_lengths
from mlembed_jax.sharding import make_mesh, num_slices, pack_ranges, packs_per_step
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
    """The target's devices: described TPU chips or GPUs (no runtime), or this process's CPU
    devices."""
    if target.platform == "gpu":
        return gpu_aot.devices(target)
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != target.num_devices:
            raise AotError(f"{len(devices)} CPU devices present but {target.num_devices} asked "
                           "for; XLA_FLAGS was set after JAX started (call "
                           "prepare_environment first)")
        return devices
    name = f"{target.chip}:{target.shape}"
    kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
    topo = _quiet_stderr(lambda: topologies.get_topology_desc(name, "tpu", **kwargs))
    if len(topo.devices) != target.num_devices:
        raise AotError(f"topology {target.spec} has {len(topo.devices)} chips, expected "
                       f"{target.num_devices}")
    return list(topo.devices)


def versions(libtpu: bool = True) -> dict:
    """jax, jaxlib and (for TPU targets) the libtpu release that compiled the step."""
    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    if libtpu:
        out["libtpu"] = libtpu_version(os.environ.get("TPU_LIBRARY_PATH")) or "unknown"
    return out


# -------------------------------------------------------------------------------------------
# Building and compiling the real step.


@dataclasses.dataclass
class Built:
    """Everything the report needs besides the compiled executable."""

    step: BuiltStep
    lowered: object
    lower_s: float
    kernel: Choice
    buckets_from: str  # where the row buckets came from


MIX_PLAN_PACKS = 8192  # packs of the benchmark mix that derive a config's row buckets


def mix_geometries(config, packs: int, seed: int = 0):
    """The row buckets' geometries for `packs` packs per step: data.rows_per_pack, or, when
    it is () (derived from the data at train time), the buckets the data plan derives from
    steps of the benchmark length mix (about MIX_PLAN_PACKS packs in all). Returns
    (geometries, a phrase saying where the buckets came from)."""
    dc = config.data
    given = row_buckets(dc)
    if dc.packing == "pad_to_longest" or given:
        rows = given or (None,)
        return ([geometry_from_config(dc, packs, r) for r in rows],
                "data.rows_per_pack" if given else "one text per row")
    steps = max(4, MIX_PLAN_PACKS // packs)
    B = int(dc.samples_per_pack)
    negatives = min(MIX_NEGATIVES, int(dc.max_negatives))
    lengths = mix_steps(steps, packs, B, negatives, seed, int(dc.max_seq_length))
    _, buckets = mix_buckets(lengths, packs, B, int(dc.seq_len), (), int(dc.num_shapes))
    return ([geometry_from_config(dc, packs, r) for r in buckets],
            f"derived from {steps} steps of the benchmark length mix (a run derives its own "
            "from its data and prints them at start-up)")


def build_lowered(config, devices, num_datasets: int = 1) -> Built:
    """Lowers mlembed_jax.train's train step for `devices`, from the config alone: the mesh
    from config.mesh over the devices, the attention kernel the run would choose there
    (model.attention="auto": by the rules only, the devices are not attached to probe),
    then `train_step.build_step` (the schedule length changes no shape, so any will do) at
    its largest row bucket (`mix_geometries`). A KD teacher (loss.teacher) is read from its
    HF config.json only."""
    mesh = make_mesh(config.mesh, devices)
    if mesh.devices.flat[0].platform == "gpu":  # kernels checked by compiling them there
        config, kernel = gpu_aot.resolve_attention(config, mesh.devices.flat)
    else:
        config, kernel = resolve_attention(config, mesh.devices.flat, check=False)
    geometries, buckets_from = mix_geometries(
        config, packs_per_step(config.data, mesh, config.mesh.logical_axis_rules))
    step = build_step(config, mesh, total_steps=max(int(config.train.max_steps), 1000),
                      num_datasets=num_datasets, geometries=geometries)
    t0 = time.time()
    base = () if step.setup.lora is None else (step.abstract_base(),)  # LoRA: frozen argument
    with step.rules_context(), gpu_aot.tracing_for(mesh.devices.flat):
        lowered = step.train.lower(step.abstract_state, step.abstract_batch(),
                                   step.abstract_teacher(), *base)
    return Built(step, lowered, time.time() - t0, kernel, buckets_from)


def compiled_text(compiled) -> tuple[str | None, str | None]:
    """(the compiled HLO text, None) or (None, why not): XLA can fail to print a program it
    compiled (e.g. a libtpu other than jax's pin), and the report must still stand."""
    try:
        return compiled.as_text(), None
    except Exception as e:  # noqa: BLE001 - an XLA error of any kind: reported, not fatal
        return None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


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
    mix: the step's samples (packs x samples_per_pack, 1 query + positive + 7 negatives)
    with the benchmark length mix (perf/benchmark_mix.py), cut at max_seq_length."""
    rows = geometry.packs * geometry.rows_per_pack
    full = flops_lib.train_flops(config.model, [geometry.seq_len] * rows)
    samples = geometry.packs * geometry.samples_per_pack
    lengths = sample_lengths(np.random.default_rng(seed), samples, 7,
                             int(config.data.max_seq_length))
    mix = flops_lib.train_flops(config.model, lengths.reshape(-1).tolist())
    return {"full": full, "mix": mix, "mix_tokens": int(lengths.sum()),
            "capacity_tokens": rows * geometry.seq_len}


def report(built: Built, compiled, target: Target, compile_s: float, max_fraction: float,
           out=None, hlo_text: str | None = None, hlo_error: str | None = None,
           prediction=None) -> bool:
    """Prints the report; returns whether the step fits (True without an HBM figure).
    hlo_text: the compiled program's text (`compiled_text`); without it (hlo_error says
    why) the collectives are left out and everything else still prints. prediction: a
    tpu_cost.Prediction, or a string saying why there is none."""
    def p(s=""):
        print(s, file=out or sys.stdout, flush=True)

    step = built.step
    c, g, setup = step.config, step.geometry, step.setup
    n_dev = target.num_devices
    v = versions(libtpu=target.platform == "tpu")
    ver = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    p(f"mlembed_jax AOT compile, {time.strftime('%Y-%m-%d')}, {ver}")
    if target.platform == "tpu":
        mismatch = check_libtpu(os.environ.get("TPU_LIBRARY_PATH"))
        if mismatch:
            p(f"WARNING: {mismatch}")
        slices = (f"{target.num_slices} slices x " if target.num_slices > 1 else "")
        dcn = " joined by DCN" if target.num_slices > 1 else ""
        p(f"target: {slices}TPU {target.chip} topology {target.shape} = {n_dev} chips{dcn}, "
          f"{_gb(target.hbm_bytes)} HBM per chip (compiled by XLA:TPU from libtpu; no TPU "
          "attached)")
    elif target.platform == "gpu":
        p(gpu_aot.target_line(target))
        p(gpu_aot.flags_line())
    else:
        hbm = f", compared with {_gb(target.hbm_bytes)} per {target.chip.upper()}" \
            if target.hbm_bytes else ""
        p(f"target: GPU-cluster planning, {n_dev} fake CPU devices{hbm}. Compiled by XLA:CPU: "
          "memory figures are ONLY INDICATIVE of a GPU (other fusions, layouts and kernels)")
    mesh = dict(step.mesh.shape)
    sliced = num_slices(step.mesh.devices.flat)
    across = (f" (data = {sliced} slices x {mesh['data'] // sliced}; fsdp and tensor inside "
              "a slice)" if sliced > 1 else "")
    p(f"mesh: {' '.join(f'{k}={v}' for k, v in mesh.items())}{across}")
    p(f"attention: {built.kernel.line()}")
    enc = setup.enc
    params = abstract_params(enc)
    p(f"model: {param_count(params):,} params ({param_count(params, True):,} non-embedding), "
      f"{enc.num_layers} layers, exits {list(enc.exits)}, MEL "
      f"{'r_max ' + str(enc.mel_r_max) if enc.mel else 'off'}, remat {enc.remat}, "
      f"attention {enc.attention}, params {enc.param_dtype}, compute {enc.compute_dtype}")
    if setup.lora is not None:
        lc = setup.lora
        p(f"LoRA: rank {lc.rank} on {','.join(lc.targets)}: "
          f"{param_count(step.abstract_state.params):,} trained params, the base frozen (the "
          "FLOPs below still count the base's weight gradients, which LoRA skips)")
    nominal = g.packs * g.samples_per_pack
    p(f"batch: {g.packs} packs x {g.samples_per_pack} samples = {nominal:,} samples/step "
      f"({nominal / n_dev:g} per chip), {g.max_negatives} negatives max; row buckets "
      f"{[x.rows_per_pack for x in step.geometries]} ({built.buckets_from}); compiled at the "
      f"largest: rows {g.packs} x {g.rows_per_pack} x {g.seq_len} = "
      f"{g.packs * g.rows_per_pack * g.seq_len:,} token slots/step; "
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
    base = step.abstract_base()  # LoRA's frozen base, an argument beside the state
    base_part = "" if base is None else f" + frozen LoRA base {_gb(per_device_bytes(base))}"
    m = hlo.memory(compiled)
    fits = True
    p("per-chip memory (compiled.memory_analysis):")
    if m is None:
        p("  unavailable on this backend")
    else:
        p(f"  arguments    {_gb(m.argument):>10}  (train state {_gb(state_b)}{base_part} + "
          f"batch {_gb(batch_b)}, by hand)")
        p(f"  outputs      {_gb(m.output):>10}  ({_gb(m.alias)} of it aliased to the donated "
          "state)")
        p(f"  temporaries  {_gb(m.temp):>10}  (activations, gradients, optimizer update)")
        p(f"  program      {_gb(m.code):>10}")
        line = f"  total        {_gb(m.total):>10}"
        if target.platform == "gpu":
            p(line + f"  of {_gb(target.hbm_bytes)} HBM ({100 * m.total / target.hbm_bytes:.0f}%)")
            fits = gpu_aot.fit_lines(m, target, p)
        elif target.hbm_bytes:
            limit = max_fraction * target.hbm_bytes
            fits = m.total <= limit
            line += (f"  of {_gb(target.hbm_bytes)} HBM ({100 * m.total / target.hbm_bytes:.0f}%)"
                     f"; limit {100 * max_fraction:.0f}% = {_gb(limit)}: "
                     + ("FITS" if fits else "DOES NOT FIT"))
        if target.platform != "gpu":
            p(line)
    p()
    hf = hand_flops(c, g)
    counted = ("4 N + 6 A tokens, LoRA's frozen base and adapters" if
               flops_lib.lora_params(c.model) else "6 N tokens")
    p(f"FLOPs per step (hand count, perf/flops.py: {counted} + causal attention):")
    p(f"  every row one full text: {hf['full']:.3e} ({hf['full'] / n_dev:.3e} per chip; "
      f"{hf['capacity_tokens']:,} tokens)")
    over = hf["mix_tokens"] > hf["capacity_tokens"]
    p(f"  benchmark length mix:    {hf['mix']:.3e} ({hf['mix'] / n_dev:.3e} per chip; "
      f"{hf['mix_tokens']:,} real tokens" + (", more than the largest bucket holds)" if over
                                             else ")"))
    if target.peak_flops:
        t_mix = hf["mix"] / n_dev / target.peak_flops
        p(f"  at {target.peak_flops / 1e12:.0f} TFLOP/s per chip: the mix takes >= "
          f"{t_mix:.3g} s/step at 100% MFU, {t_mix / 0.4:.3g} s at 40%")
    cf = hlo.cost_flops(compiled)
    if cf is not None:
        p(f"  XLA cost_analysis: {cf:.3e} per chip. Not used: it counts the scanned layer body "
          f"once, not {enc.num_layers} times")
    if prediction is not None:
        from mlembed_jax.perf import tpu_cost

        p()
        for line in tpu_cost.report_lines(prediction, hf, n_dev, target.peak_flops):
            p(line)
    p()
    if hlo_text is None:
        p(f"collectives: the compiled HLO text is unavailable ({hlo_error}); the figures "
          "above stand")
        cols = []
    else:
        cols = hlo.collectives(hlo_text)
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
        if target.num_slices > 1:
            p("  (each slice runs its own copy of this program: these stay inside a slice)")
    if hlo_text is not None:
        cp = hlo.copy_ops(hlo_text)
        trips = (f"; {cp.unknown_trips} loops of unknown trip count counted once"
                 if cp.unknown_trips else "")
        p(f"copy/transpose ops in the compiled HLO: {cp.ops} ({cp.in_loop} in loops), run "
          f"{cp.per_step} times per step, {_gb(cp.bytes_per_step)} written per step (loop "
          f"bodies times their trip count{trips})")
    if hlo_text is not None and target.num_slices > 1:
        dcn_report(hlo.dcn_transfers(hlo_text), enc.num_layers, p)
    if hlo_text is not None and target.nodes > 1:
        gpu_aot.node_report(hlo_text, step.mesh, enc.num_layers, p)
    p()
    if m is not None and target.platform == "gpu":
        gpu_aot.result_line(m, target, fits, step, state_b, p)
    elif m is not None and target.hbm_bytes:
        p(f"RESULT: {'fits' if fits else 'does NOT fit'}: {_gb(m.total)} per chip "
          f"of {_gb(target.hbm_bytes)}" + (" (indicative only: XLA:CPU)" if
                                            target.indicative else ""))
    return fits


def dcn_summary(transfers: list, num_layers: int) -> list[dict]:
    """Cross-slice transfers grouped by (kind, in_loop): count, bytes per chip per
    occurrence of the group, and bytes per chip per step (in-loop ones run num_layers
    times)."""
    groups: dict = {}
    for t in transfers:
        groups.setdefault((t.kind, t.in_loop), []).append(t)
    out = []
    for (kind, in_loop), ts in sorted(groups.items()):
        sent = sum(t.bytes for t in ts)
        out.append(dict(kind=kind, in_loop=in_loop, count=len(ts), bytes=sent,
                        per_step=sent * (num_layers if in_loop else 1),
                        largest=max(ts, key=lambda t: t.bytes).result))
    return out


def dcn_report(transfers: list, num_layers: int, p) -> None:
    p()
    p("collectives across slices (DCN: the megascale runtime's sends in the compiled HLO; "
      "bytes per chip):")
    if not transfers:
        p("  none")
        return
    rows = dcn_summary(transfers, num_layers)
    for r in rows:
        when = (f"per layer (in the scan), x {num_layers} = {_gb(r['per_step'])}/step"
                if r["in_loop"] else "once per step")
        p(f"  {r['kind']:<12} {r['count']:>4}  {_gb(r['bytes']):>10}  {when}; largest "
          f"{r['largest']}")
    p(f"  total: {_gb(sum(r['per_step'] for r in rows))} per chip per step over DCN")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether a compile error is XLA running out of device memory."""
    text = str(err)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Ran out of memory",
                                   "out of memory", "exceeds the memory"))
