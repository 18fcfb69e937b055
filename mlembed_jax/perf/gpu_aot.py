"""The GPU side of an AOT compile (perf/aot.py): described NVIDIA GPUs, the memory budget a
JAX process really gets on them, what to change when the step is over it, and what crosses
the node boundary per step.

Limits of compiling for a GPU without one (jax 0.10.2): XLA's cost analysis is not
available (perf/flops.py counts FLOPs instead); GEMMs are not autotuned, so the program
says nothing about speed; XLA:GPU never fails for lack of memory (it rematerialises toward
a limit derived from the spec's `device_memory_size`, 60.40 GiB for an H100, and compiles
the step anyway when it cannot get there), so the check against the fraction JAX
preallocates is made here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from mlembed_jax import attention_choice
from mlembed_jax.config import apply_overrides
from mlembed_jax.model.kernel_choice import AUTO
from mlembed_jax.perf import gpu_target, hlo
from mlembed_jax.perf.aot_target import AotError, Target

# What launch/slurm_gpu.sbatch exports; printed beside JAX's default as the second budget.
LAUNCHER_MEM_FRACTION = 0.90


def devices(target: Target) -> list:
    """target.num_devices GPUs described by JAX's CUDA plugin from the target's spec: one
    process (host) per node, so device.process_index is the node."""
    spec = gpu_target.load(target.chip)
    per_node = target.num_devices // target.nodes
    # <NVLink domains>x<hosts per domain>x<GPUs per host>: an H100/H200/B200 node is its
    # own NVLink domain.
    topo = topologies.get_topology_desc(platform="cuda", target_config=spec.text,
                                        topology=f"{target.nodes}x1x{per_node}")
    devs = list(topo.devices)
    if len(devs) != target.num_devices:
        raise AotError(f"the CUDA plugin described {len(devs)} GPUs for {target.spec}, "
                       f"expected {target.num_devices}")
    return devs


@contextlib.contextmanager
def tracing_for(devices):
    """Context for tracing a step for described GPUs: tokamax picks its kernel (and whether
    it may run at all) from JAX's default device, which is this machine's CPU; it is made the
    first GPU, and tokamax's hardware check is off (its cross-compile option). A no-op for
    other devices."""
    devices = list(devices)
    if not devices or devices[0].platform != "gpu":
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_device(devices[0]))
        if importlib.util.find_spec("tokamax") is not None:
            from mlembed_jax.model.attention import _import_tokamax

            stack.enter_context(_import_tokamax().config.cross_compile(True))
        yield


def compile_problem(name: str, model_cfg, seq_len: int, device) -> str | None:
    """None if attention kernel `name` (forward and gradients, two rows of seq_len with the
    model's heads, head_dim and compute dtype) compiles for the described GPU `device`, else
    why not (one line). The AOT stand-in for a run's start-up check: compiled, not run."""
    from mlembed_jax.model import attention  # its kernels import tokamax lazily

    sh = jax.sharding.SingleDeviceSharding(device)
    dt = jnp.dtype(str(model_cfg.compute_dtype))
    heads = (int(model_cfg.num_heads), int(model_cfg.num_kv_heads), int(model_cfg.num_kv_heads))
    qkv = [jax.ShapeDtypeStruct((2, seq_len, h, int(model_cfg.head_dim)), dt, sharding=sh)
           for h in heads]
    seg = jax.ShapeDtypeStruct((2, seq_len), jnp.int32, sharding=sh)
    fn = attention.get_attention(name)
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s).astype(jnp.float32))
    try:
        with tracing_for([device]):
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*qkv, seg).compile()
    except Exception as e:  # noqa: BLE001 - any failure to lower or compile is the finding
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    return None


def resolve_attention(config, devices):
    """attention_choice.resolve_attention for described GPUs: model.attention "auto" takes
    the first candidate that compiles for this GPU (`compile_problem`, where a run would run
    its start-up check), an explicit kernel must compile (AotError naming the fix), and
    model.remat "auto" follows the kernel. Returns (resolved config, kernel_choice.Choice)."""
    devices = list(devices)
    m, device = config.model, devices[0]
    seq_len = int(config.data.seq_len)
    gpu = device.device_kind
    check = lambda name: compile_problem(name, m, seq_len, device)
    resolved, choice = attention_choice.resolve_attention(config, devices, check=False,
                                                         probe=check)
    if m.attention == AUTO:
        choice = dataclasses.replace(choice, reason=choice.reason.replace(
            "matched dense on this run's devices", f"compiles for the {gpu} (not run: compile "
            "only)").replace("FAILED its start-up check against dense", f"does not compile "
                             f"for the {gpu}"),
            passed_over=tuple((n, w.replace("FAILED its start-up check against dense",
                                            f"does not compile for the {gpu}"))
                              for n, w in choice.passed_over))
    elif choice.kernel != "dense":  # choose() checks an explicit kernel's platform only
        problem = check(choice.kernel)
        if problem:
            raise AotError(f"model.attention={choice.kernel!r} does not compile for the {gpu}: "
                           f"{problem}; pick another kernel (model.attention=auto takes the "
                           "first that compiles)")
    return resolved, choice


def node_config(config, target: Target):
    """The config with the data axis across nodes (mesh.dcn_data = nodes; mesh.data, fsdp
    and tensor then describe one node), as `--config.mesh.dcn_data=NODES` does for a run.
    AotError for a dcn_data set to another node count."""
    if target.nodes == 1:
        return config
    dcn = int(config.mesh.get("dcn_data", -1))
    if dcn not in (-1, target.nodes):
        raise AotError(f"--topology={target.spec} has {target.nodes} nodes but "
                       f"mesh.dcn_data={dcn}; leave it at -1 or set {target.nodes}")
    out = apply_overrides(config, {"mesh.dcn_data": target.nodes})
    if config.is_locked:
        out.lock()
    return out


@dataclasses.dataclass(frozen=True)
class Budget:
    fraction: float
    source: str  # "JAX's default preallocation", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", ...
    hbm: float

    @property
    def bytes(self) -> float:
        return self.fraction * self.hbm


def budgets(hbm: float, environ=None) -> tuple[Budget, list[Budget]]:
    """(the budget a JAX process on this GPU gets: XLA_PYTHON_CLIENT_MEM_FRACTION if set,
    else JAX's 75%; [that one and the others worth printing])."""
    frac, source = gpu_target.mem_fraction(environ)
    main = Budget(frac, source, hbm)
    shown = [main]
    if source != "JAX's default preallocation":
        shown.append(Budget(gpu_target.JAX_DEFAULT_MEM_FRACTION, "JAX's default preallocation",
                            hbm))
    if frac != LAUNCHER_MEM_FRACTION:
        shown.append(Budget(LAUNCHER_MEM_FRACTION, f"{gpu_target.MEM_FRACTION_ENV}="
                            f"{LAUNCHER_MEM_FRACTION:.2f} (launch/slurm_gpu.sbatch)", hbm))
    return main, shown


def knobs(step, memory: hlo.Memory, budget: Budget, state_bytes: int,
          nodes: int = 1) -> list[str]:
    """What would bring an over-budget step under `budget`, most direct first."""
    enc, setup = step.setup.enc, step.setup
    mesh = dict(step.mesh.shape)
    per_node = int(np.prod(list(mesh.values()))) // nodes
    out = []
    if state_bytes > 0.8 * budget.bytes:
        out.append(f"the train state alone is {state_bytes / 1e9:.2f} GB per GPU, which remat "
                   f"and chunks do not shrink: shard it over more GPUs (mesh.fsdp="
                   f"{mesh['fsdp']} now; a larger --topology, mesh.fsdp=-1 shards over all "
                   "of a node's GPUs)")
    elif mesh["fsdp"] * mesh["tensor"] < per_node:
        out.append(f"mesh.fsdp={mesh['fsdp']}: set mesh.fsdp=-1 and mesh.data=1 to shard the "
                   f"parameters and optimizer state over all {per_node} GPUs of a node")
    if enc.remat != "full":
        out.append(f"model.remat=full (now {enc.remat}): recompute each layer in the backward "
                   "pass, the least activation memory")
    if not setup.grad_cache_chunks:
        out.append("train.grad_cache_chunks=K: embed the step's packs K chunks at a time, "
                   "activations of one chunk only, for one extra forward pass")
    else:
        out.append(f"more train.grad_cache_chunks (now {setup.grad_cache_chunks}): smaller "
                   "chunks, less activation memory")
    for frac in (0.9, 0.95):
        if frac > budget.fraction and memory.total <= frac * budget.hbm:
            out.append(f"{gpu_target.MEM_FRACTION_ENV}={frac:.2f}: the step fits in "
                       f"{frac:.0%} of HBM")
            break
    return out


def fit_lines(memory: hlo.Memory, target: Target, p) -> bool:
    """Prints the fit against each budget; returns whether the step fits the main one."""
    main, shown = budgets(target.hbm_bytes)
    note = None
    if memory.total > target.hbm_bytes:
        note = "more than the whole HBM, even after XLA:GPU's rematerialisation"
    elif memory.total > 0.7 * target.hbm_bytes:
        note = ("XLA:GPU rematerialises a step near its own memory limit (about 76% of HBM), "
                "recomputing more than the config asks for")
    for b in shown:
        ok = memory.total <= b.bytes
        p(f"  {'FITS' if ok else 'DOES NOT FIT'} in {b.fraction:.0%} of HBM = "
          f"{b.bytes / 1e9:.2f} GB ({b.source})" + (" <- this run's budget" if b is main and
                                                    len(shown) > 1 else ""))
    if note:
        p(f"  ({note})")
    return memory.total <= main.bytes


def result_line(memory: hlo.Memory, target: Target, fits: bool, step, state_bytes: int,
                p) -> None:
    main, _ = budgets(target.hbm_bytes)
    gpu = gpu_target.load(target.chip).device_name
    if fits:
        p(f"RESULT: fits: {memory.total / 1e9:.2f} GB per GPU, within {main.fraction:.0%} of "
          f"the {target.hbm_bytes / 1e9:.2f} GB of an {gpu} ({main.source}; XLA:GPU)")
        return
    p(f"RESULT: does NOT fit: {memory.total / 1e9:.2f} GB per GPU (arguments "
      f"{memory.argument / 1e9:.2f} + temporaries {memory.temp / 1e9:.2f} GB) > "
      f"{main.bytes / 1e9:.2f} GB = {main.fraction:.0%} of an {gpu}'s "
      f"{target.hbm_bytes / 1e9:.2f} GB ({main.source}; XLA:GPU). What would help:")
    for k in knobs(step, memory, main, state_bytes, target.nodes):
        p(f"  - {k}")


def target_line(target: Target) -> str:
    spec = gpu_target.load(target.chip)
    nodes = (f"{target.nodes} nodes x {target.num_devices // target.nodes}"
             if target.nodes > 1 else f"{target.num_devices}x")
    return (f"target: {nodes} {spec.device_name} (compute capability "
            f"{spec.compute_capability}), {target.hbm_bytes / 1e9:.2f} GB HBM per GPU. Compiled "
            f"by XLA:GPU from XLA's description of the GPU (gpu_specs/{spec.spec_file}), no GPU "
            "attached: memory is XLA:GPU's buffer assignment; GEMMs are not autotuned")


def flags_line(environ=None) -> str:
    """The XLA:GPU flags the compile ran with: they change fusion, scheduling and buffers."""
    env = os.environ if environ is None else environ
    gpu = [f for f in env.get("XLA_FLAGS", "").split() if f.startswith("--xla_gpu")]
    if gpu:
        return f"XLA:GPU flags: {' '.join(gpu)}"
    return ("XLA:GPU flags: none (launch/slurm_gpu.sbatch runs with launch/xla_gpu_flags.sh's; "
            "`source launch/xla_gpu_flags.sh` first to compile with them)")


# -------------------------------------------------------------------------------------------
# What crosses the node boundary.

_GROUPS = re.compile(r"replica_groups=(\{(?:\{[\d,]*\},?)*\}|\[[\d,]+\]<=\[[\d,]+\]"
                     r"(?:T\([\d,]+\))?)")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))?"
                         r"\s*\{([^}]*)\}")


def _iota(text: str) -> np.ndarray:
    """XLA's iota list: '[2,2]<=[4]', '[4]<=[2,2]T(1,0)' or '[2,2]T(1,0)' -> ids."""
    m = re.fullmatch(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", text.strip())
    if not m:
        raise ValueError(text)
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in (m.group(2) or m.group(1)).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(shape)


def _mesh_groups(axes_text: str, device_ids: str | None, group_axes: str) -> list[list[int]]:
    """XLA's mesh form: mesh['axis_0'=2,'axis_1'=4], device_ids=([8]...) {'axis_1'}: the
    devices laid out on the named axes; a group is the devices that differ only along the
    axes in braces."""
    axes = re.findall(r"'([^']+)'=(\d+)", axes_text)
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = (_iota(device_ids) if device_ids else np.arange(int(np.prod(sizes)))).reshape(sizes)
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", group_axes)]
    others = [i for i in range(len(names)) if i not in grouped]
    size = int(np.prod([sizes[i] for i in grouped])) if grouped else 1
    return ids.transpose(others + grouped).reshape(-1, size).tolist()


def replica_groups(text: str) -> list[list[int]] | None:
    """The replica groups of an HLO instruction line: explicit {{0,1},{2,3}}, iota
    [2,2]<=[4] / [2,2]<=[2,2]T(1,0), or the mesh form mesh['axis_0'=2,...] {'axis_0'};
    collective-permute pairs as groups of two; None when the line has none ({} means all
    devices). ValueError for a form not read here."""
    m = _PAIRS.search(text)
    if m:
        return [[int(x) for x in g.split(",")] for g in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
    m = _MESH_GROUPS.search(text)
    if m:
        return _mesh_groups(m.group(1), m.group(2), m.group(3))
    if "replica_groups=mesh[" in text:
        raise ValueError(text[text.index("replica_groups="):][:200])
    m = _GROUPS.search(text)
    if not m:
        return None
    g = m.group(1)
    if g.startswith("{"):
        return [[int(x) for x in s.split(",") if x] for s in re.findall(r"\{([\d,]*)\}", g[1:-1])]
    return _iota(g).tolist()


@dataclasses.dataclass
class NodeTransfer:
    kind: str
    result: str
    bytes: int  # per GPU, the collective's result
    in_loop: bool
    unread: bool = False  # its device groups were in a form not read here


def node_transfers(hlo_text: str, node_of: list[int]) -> list[NodeTransfer]:
    """The collectives of an SPMD program whose device groups span more than one node.
    node_of[i]: the node of the program's device i (its partition id)."""
    comps = hlo.computations(hlo_text)
    in_loop = hlo.loop_computations(comps)
    every = [list(range(len(node_of)))]
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = hlo._INSTR.match(line)
            if not m:
                continue
            rtype, op = m.group(1), m.group(2)
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in hlo._COLLECTIVES:
                continue
            try:
                groups = replica_groups(line)
            except ValueError:  # a form not read here: counted as crossing, and said so
                groups, unread = every, True
            else:
                unread = False
            if groups is None or groups == [[]] or groups == []:
                groups = every
            if not any(len({node_of[i] for i in g}) > 1 for g in groups):
                continue
            sizes = hlo._array_bytes(rtype)
            nbytes = (max(sizes) if op.endswith("-start") else sum(sizes)) if sizes else 0
            shapes = re.sub(r"\{[^}]*\}", "", rtype)
            out.append(NodeTransfer(base, shapes[:97] + "..." if len(shapes) > 100 else shapes,
                                    nbytes, name in in_loop, unread))
    return out


def node_report(hlo_text: str, mesh, num_layers: int, p) -> list[dict]:
    """Prints the collectives whose groups span nodes, per GPU and step; returns the rows."""
    node_of = [d.process_index for d in mesh.devices.flat]
    transfers = node_transfers(hlo_text, node_of)
    p()
    p("collectives across nodes (device groups that span nodes in the compiled HLO; bytes "
      "per GPU, the collective's result):")
    if not transfers:
        p("  none")
        return []
    groups: dict = {}
    for t in transfers:
        groups.setdefault((t.kind, t.in_loop), []).append(t)
    rows = []
    for (kind, loop), ts in sorted(groups.items()):
        sent = sum(t.bytes for t in ts)
        per_step = sent * (num_layers if loop else 1)
        rows.append(dict(kind=kind, in_loop=loop, count=len(ts), bytes=sent, per_step=per_step))
        when = (f"per layer (in the scan), x {num_layers} = {per_step / 1e9:.3f} GB/step"
                if loop else "once per step")
        big = max(ts, key=lambda t: t.bytes)
        p(f"  {kind:<20} {len(ts):>4}  {sent / 1e6:>10.2f} MB  {when}; largest {big.result}")
    p(f"  total: {sum(r['per_step'] for r in rows) / 1e9:.3f} GB per GPU per step across "
      "nodes")
    unread = sum(t.unread for t in transfers)
    if unread:
        p(f"  ({unread} of them have device groups in a form not read here; counted as "
          "crossing)")
    return rows
