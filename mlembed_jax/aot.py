"""Ahead-of-time compilation of the real train step for hardware we do not have.

`tools/aot_compile.py` is the command line; this module does the work:
  * a target: a TPU topology described by libtpu (`v5p:4x4x4`, `v6e:8x8`, ...) with no TPU
    attached, or N fake CPU devices standing in for a GPU cluster (`h100:8`, `h200:16`);
  * the step: the same StepSetup, abstract train state, rules-table shardings and jitted
    `train_step` that `mlembed_jax.train` runs, lowered on ShapeDtypeStructs (no weights, no
    data) and compiled for the target;
  * the report: per-chip memory from `compiled.memory_analysis()`, FLOPs per step counted by
    hand (`mlembed_jax.flops`; XLA's cost analysis counts a scanned layer body only once),
    and the collectives in the compiled HLO.

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

# HBM per chip (decimal bytes, vendor datasheets) and dense bf16 peak FLOP/s per chip.
TPU_CHIPS = {
    "v4": (32e9, 275e12),
    "v5e": (16e9, 197e12),
    "v5litepod": (16e9, 197e12),
    "v5p": (95e9, 459e12),
    "v6e": (32e9, 918e12),
}
GPU_CHIPS = {
    "h100": (80e9, 989e12),
    "h200": (141e9, 989e12),
    "a100": (80e9, 312e12),
    "cpu": (None, None),  # plain shape check: no memory limit
}


class AotError(RuntimeError):
    """A target or environment the tool cannot use; the message says what to do."""


class LibtpuMissing(AotError):
    """libtpu is not installed, so TPU topologies cannot be described here."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for. platform: 'tpu' (libtpu topology) or 'cpu' (fake devices)."""

    spec: str  # as given: "v5p:4x4x4", "h100:8"
    platform: str
    chip: str  # "v5p", "h100", ...
    shape: str  # "4x4x4" (TPU) or the device count (GPU planning)
    num_devices: int
    hbm_bytes: float | None
    peak_flops: float | None

    @property
    def indicative(self) -> bool:
        return self.platform == "cpu"


def parse_target(spec: str) -> Target:
    """'v5p:4x4x4' -> a 64-chip TPU target; 'h100:8' -> 8 fake CPU devices sized as H100s."""
    if ":" not in spec:
        raise AotError(f"--topology={spec!r}: expected CHIP:SHAPE, e.g. v5p:4x4x4, v6e:8x8, "
                       "or GPU:COUNT for cluster planning, e.g. h100:8")
    chip, shape = spec.lower().split(":", 1)
    if chip in TPU_CHIPS:
        dims = shape.split("x")
        if not all(d.isdigit() and int(d) > 0 for d in dims):
            raise AotError(f"--topology={spec!r}: TPU shape must look like 4x4x4 or 8x8")
        n = 1
        for d in dims:
            n *= int(d)
        hbm, peak = TPU_CHIPS[chip]
        return Target(spec, "tpu", chip, shape, n, hbm, peak)
    if chip in GPU_CHIPS:
        if not shape.isdigit() or int(shape) < 1:
            raise AotError(f"--topology={spec!r}: GPU planning takes a device count, e.g. h100:8")
        hbm, peak = GPU_CHIPS[chip]
        return Target(spec, "cpu", chip, shape, int(shape), hbm, peak)
    raise AotError(f"--topology={spec!r}: unknown chip {chip!r}; TPU: {sorted(TPU_CHIPS)}, "
                   f"GPU planning on fake CPU devices: {sorted(GPU_CHIPS)}")


# -------------------------------------------------------------------------------------------
# Environment: must be set before JAX creates a backend.


def find_libtpu() -> str | None:
    """Path of libtpu.so: $TPU_LIBRARY_PATH, the `libtpu` package, or the copy `make setup`
    puts under <venv>/libtpu (kept off sys.path, so ordinary CPU runs never load it)."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    try:
        import libtpu
    except ImportError:  # not importable: look beside the venv (make libtpu puts it there)
        side = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
        return side if os.path.isfile(side) else None
    return libtpu.get_library_path()


def prepare_environment(target: Target) -> None:
    """Env vars for the target; call before anything creates a JAX backend.

    Compilation never needs a local accelerator, so the local backend is always CPU (a GPU
    machine would otherwise grab its GPUs). Fake CPU devices get their count from XLA_FLAGS.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: the env var alone is read too late
        try:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
        except Exception as e:  # a backend already exists; say so rather than hide it
            import warnings

            warnings.warn(f"could not switch JAX to the CPU backend ({e}); the compile may "
                          "use a local accelerator")
    if target.platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={target.num_devices}").strip()
        return
    path = find_libtpu()
    if path is None:
        raise LibtpuMissing(
            "libtpu is not installed, so TPU topologies cannot be described on this machine. "
            "Install it with `make libtpu` (into the venv, off the import path) or "
            "`pip install 'mlembed_jax[tpu]'`, or point TPU_LIBRARY_PATH at a libtpu.so.")
    os.environ["TPU_LIBRARY_PATH"] = path
    # Several compiles may run at once (tests, other users): libtpu otherwise takes a
    # machine-wide lock meant for real chips. No metadata server here either.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


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
    import jax

    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != target.num_devices:
            raise AotError(f"{len(devices)} CPU devices present but {target.num_devices} asked "
                           "for; XLA_FLAGS was set after JAX started (call "
                           "prepare_environment first)")
        return devices
    from jax.experimental import topologies

    name = f"{target.chip}:{target.shape}"
    topo = _quiet_stderr(lambda: topologies.get_topology_desc(name, "tpu"))
    if len(topo.devices) != target.num_devices:
        raise AotError(f"topology {target.spec} has {len(topo.devices)} chips, expected "
                       f"{target.num_devices}")
    return list(topo.devices)


def versions(libtpu: bool = True) -> dict:
    """jax, jaxlib and (for TPU targets) the libtpu release that compiled the step."""
    import jax
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    if not libtpu:
        return out
    try:
        from importlib import metadata

        out["libtpu"] = metadata.version("libtpu")
    except Exception:  # the copy under <venv>/libtpu: read its dist-info name
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

    config: object
    mesh: object
    setup: object  # train_step.StepSetup
    abstract_state: object  # TrainState of ShapeDtypeStructs with shardings
    abstract_batch: dict
    lowered: object
    lower_s: float


def build_lowered(config, devices, num_datasets: int = 1) -> Built:
    """Lowers mlembed_jax.train's train step for `devices`, from the config alone.

    Same pieces as train.run: mesh from config.mesh over the devices, packs per step from
    config.data and the mesh, geometry from data.* (samples_per_pack, rows_per_pack,
    seq_len, max_negatives, spare slots), optimizer from config.optim, loss options from
    config.loss with pack-local lookups. A KD teacher (loss.teacher) is read from its HF
    config.json only. Batch arrays: [P*R, S] tokens etc. and [P, ...] slots, leading dim
    sharded over the batch axes.
    """
    import jax

    from mlembed_jax.checkpoint import abstract_with_shardings
    from mlembed_jax.data.global_batch import packs_per_step
    from mlembed_jax.data.pipeline import geometry_from_config
    from mlembed_jax.loss import config_kwargs
    from mlembed_jax.model.encoder import abstract_params, param_logical_axes
    from mlembed_jax.model.qwen3 import EncoderConfig
    from mlembed_jax.optim import make_optimizer
    from mlembed_jax.sharding import activation_rules, logical_shardings, make_mesh
    from mlembed_jax.state_init import abstract_state
    from mlembed_jax.train_step import (StepSetup, batch_shardings, jit_steps,
                                        state_shardings)

    mesh = make_mesh(config.mesh, devices)
    rules = config.mesh.logical_axis_rules
    packs = packs_per_step(config.data, mesh)
    geometry = geometry_from_config(config.data, packs)
    enc = EncoderConfig.from_config(config.model)
    total_steps = max(int(config.train.max_steps), 1000)  # the schedule's length: no shapes
    tx, schedule = make_optimizer(config.optim, total_steps)
    teacher, teacher_sh, teacher_abs = None, None, None
    if config.loss.teacher:
        from mlembed_jax.model.hf_import import encoder_config_from_hf

        teacher = encoder_config_from_hf(config.loss.teacher, compute_dtype=enc.compute_dtype,
                                         param_dtype=enc.compute_dtype,
                                         attention=enc.attention, exits=())
        teacher = teacher.truncated(teacher.num_layers)
        teacher_sh = logical_shardings(param_logical_axes(teacher), mesh, rules)
        teacher_abs = abstract_with_shardings(abstract_params(teacher), teacher_sh)
    setup = StepSetup(enc=enc, geometry=geometry, tx=tx, schedule=schedule,
                      loss_kwargs=config_kwargs(config.loss, packs=packs),
                      num_datasets=num_datasets, teacher=teacher)
    abstract = abstract_state(setup, int(config.train.seed))
    state_sh = state_shardings(setup, mesh, rules, abstract)
    state = abstract_with_shardings(abstract, state_sh)
    b_sh = batch_shardings(mesh, geometry)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=b_sh[k])
             for k, (shape, dtype) in geometry.shapes().items()}
    train_fn, _ = jit_steps(setup, mesh, state_sh, teacher_sh)
    t0 = time.time()
    with activation_rules(mesh, rules):
        lowered = train_fn.lower(state, batch, teacher_abs)
    return Built(config, mesh, setup, state, batch, lowered, time.time() - t0)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


# -------------------------------------------------------------------------------------------
# Reading the compiled program.


@dataclasses.dataclass
class Memory:
    """Per-device bytes from compiled.memory_analysis(). total = what must fit in HBM:
    arguments + outputs not aliased to (donated) arguments + temporaries + program."""

    argument: int
    output: int
    alias: int
    temp: int
    code: int

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code


def memory(compiled) -> Memory | None:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                  int(m.generated_code_size_in_bytes))


def cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "ragged-all-to-all", "collective-broadcast")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8\w*)"
                    r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                    r"called_computations)=\{?([%\w.\-, ]+)\}?")


@dataclasses.dataclass
class Collective:
    kind: str  # all-reduce, all-gather, ... ("-start" async forms folded in)
    result: str  # result type text, e.g. bf16[1,4096,12288]
    bytes: int  # bytes of the result (largest array for async -start tuples)
    in_loop: bool  # inside a while body (the layer scan): runs once per iteration


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * _BYTES.get(dtype, 1))
    return out


def collectives(hlo_text: str) -> list[Collective]:
    """Collective ops of an HLO module's text, each marked as inside a while loop or not."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current is not None:
            if line.startswith("}"):
                current = None
            else:
                comps[current].append(line)
    # Computations reachable from a while body run once per loop iteration.
    loop_roots = set()
    for lines in comps.values():
        for line in lines:
            m = re.search(r"\bbody=%?([\w.\-]+)", line)
            if m and " while(" in line:
                loop_roots.add(m.group(1))
    in_loop, stack = set(), list(loop_roots)
    while stack:
        name = stack.pop()
        if name in in_loop or name not in comps:
            continue
        in_loop.add(name)
        for line in comps[name]:
            for group in _CALLS.findall(line):
                stack.extend(n.strip().lstrip("%") for n in group.split(",") if n.strip())
    found = []
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            rtype, op = m.group(1), m.group(2)
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in _COLLECTIVES:
                continue
            sizes = _array_bytes(rtype)
            nbytes = (max(sizes) if op.endswith("-start") else sum(sizes)) if sizes else 0
            shapes = re.sub(r"\{[^}]*\}", "", rtype)  # drop layouts
            found.append(Collective(base, shapes if len(shapes) < 100 else shapes[:97] + "...",
                                    nbytes, name in in_loop))
    return found


# -------------------------------------------------------------------------------------------
# The report.


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def hand_flops(config, geometry, seed: int = 0) -> dict:
    """Model FLOPs of one step by hand (forward + backward, mlembed_jax.flops):
    full: every packed row one causal text of seq_len (an upper bound of the step's work);
    mix: the step's nominal samples (packs x samples_per_pack, 1 query + positive + 7
    negatives) with the ANCHORS benchmark length mix, cut at max_seq_length."""
    import numpy as np

    from mlembed_jax import flops as flops_lib
    from mlembed_jax.data.benchmark_mix import sample_lengths

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
    from mlembed_jax.model.encoder import abstract_params
    from mlembed_jax.model.qwen3 import param_count

    def p(s=""):
        print(s, file=out or sys.stdout, flush=True)

    c, g, setup = built.config, built.setup.geometry, built.setup
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
    mesh = dict(built.mesh.shape)
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
    hosts = sorted({d.process_index for d in built.mesh.devices.flat})
    if len(hosts) > 1:
        from mlembed_jax.distributed import pack_ranges

        ranges = pack_ranges(built.mesh, g.packs)
        sizes = {b - a for a, b in ranges.values()}
        p(f"hosts: {len(hosts)} processes ({n_dev // len(hosts)} chips each), each building "
          f"{'/'.join(map(str, sorted(sizes)))} pack(s) of every step "
          f"(process 0: packs [{ranges[0][0]}, {ranges[0][1]}))")
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
    state_b = per_device_bytes(built.abstract_state)
    batch_b = per_device_bytes(built.abstract_batch)
    m = memory(compiled)
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
    p("FLOPs per step (hand count, mlembed_jax.flops: 6 N tokens + causal attention):")
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
    cf = cost_flops(compiled)
    if cf is not None:
        p(f"  XLA cost_analysis: {cf:.3e} per chip. Not used: it counts the scanned layer body "
          f"once, not {enc.num_layers} times")
    p()
    cols = collectives(compiled.as_text())
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
