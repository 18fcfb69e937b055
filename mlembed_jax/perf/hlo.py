"""Reading a compiled XLA program: per-device memory, XLA's FLOP count, its collectives, and
which of them cross slices (DCN) in a multi-slice TPU program.

Used by the training loop's start-up line, the AOT report (perf/aot.py) and its tests.
"""

from __future__ import annotations

import dataclasses
import re


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
    """compiled.memory_analysis() as a Memory, or None where the backend has none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if m is None:
        return None
    return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                  int(m.generated_code_size_in_bytes))


def cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend has one: no figure
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


def computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current is not None:
            # Only a line that is exactly "}" ends a computation: Pallas custom calls (splash)
            # carry kernel metadata with raw newlines, so lines like "}}, metadata=..." occur
            # inside one.
            if line.rstrip() == "}":
                current = None
            else:
                comps[current].append(line)
    return comps


def loop_computations(comps: dict[str, list[str]]) -> set[str]:
    """Names of the computations reachable from a while body: they run once per iteration."""
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
    return in_loop


def collectives(hlo_text: str) -> list[Collective]:
    """Collective ops of an HLO module's text, each marked as inside a while loop or not."""
    comps = computations(hlo_text)
    in_loop = loop_computations(comps)
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


# Multi-slice TPU programs: XLA compiles one program per slice, whose replica groups only
# name that slice's chips. Collectives across slices (over the data-center network, DCN) are
# host-transfer sends to the megascale runtime, tagged with frontend attributes, e.g.
#   %send.1 = (f32[1024,8,128]{...}, u32[], token[]) send(...), is_host_transfer=true,
#     frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",
#     _xla_megascale_reduce_operation="SUM", _xla_megascale_target="{1,2}x{0:3}",
#     _xla_megascale_transfer_type="ALL_REDUCE"}
_SEND = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\((.+?),\s*u32\[\],\s*token\[\]\)"
                   r"\s+send\(")
_MEGASCALE_ATTR = re.compile(r'(_xla_megascale_\w+)=("[^"]*"|\{(?:\{[\d,]*\},?)*\})')


@dataclasses.dataclass
class DcnTransfer:
    """One collective across slices: what the megascale runtime sends from each chip."""

    kind: str  # ALL_REDUCE, ALL_GATHER, ...
    reduce: str | None  # SUM, ... (reductions only)
    result: str  # payload type, e.g. bf16[768,8,128]
    bytes: int  # payload bytes per chip
    slices: list[list[int]] | None  # groups of slice indices that exchange data
    in_loop: bool  # inside the layer scan: sent once per layer


def megascale_slices(target: str | None) -> list[list[int]] | None:
    """_xla_megascale_target -> groups of (0-based) slice indices.

    Two forms (libtpu 0.0.42): "{1,2}x{0:3}" (1-based slice ids x a local chip range: each
    chip with the same chip of every listed slice) and explicit groups of global device ids
    "{{100000,300000},...}", where a described chip's id is (slice + 1) * 100000 + local id.
    """
    if not target:
        return None
    m = re.fullmatch(r"\{([\d,]+)\}x\{\d+:\d+\}", target)
    if m:
        return [[int(x) - 1 for x in m.group(1).split(",")]]
    groups = {tuple(sorted({int(x) // 100000 - 1 for x in g.split(",") if x}))
              for g in re.findall(r"\{([\d,]*)\}", target)}
    return [list(g) for g in sorted(groups)] or None


def dcn_transfers(hlo_text: str) -> list[DcnTransfer]:
    """The cross-slice (DCN) collectives of a multi-slice TPU program's HLO text; [] for a
    single-slice program."""
    comps = computations(hlo_text)
    in_loop = loop_computations(comps)
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = _SEND.match(line)
            if not m or "xla_megascale_runtime" not in line:
                continue
            attrs = {k: v.strip('"') for k, v in _MEGASCALE_ATTR.findall(line)}
            payload = re.sub(r"\{[^}]*\}", "", m.group(2))  # drop layouts
            out.append(DcnTransfer(
                kind=attrs.get("_xla_megascale_transfer_type", "unknown"),
                reduce=attrs.get("_xla_megascale_reduce_operation"), result=payload,
                bytes=sum(_array_bytes(payload)),
                slices=megascale_slices(attrs.get("_xla_megascale_target")),
                in_loop=name in in_loop))
    return out


def memory_line(compiled) -> str:
    """One line of per-device memory for a log, saying so when the backend has none."""
    m = memory(compiled)
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 2 ** 30
    return (f"per device: arguments {m.argument / gib:.3f} GiB, outputs {m.output / gib:.3f} "
            f"GiB, temporaries {m.temp / gib:.3f} GiB, aliased {m.alias / gib:.3f} GiB")


@dataclasses.dataclass
class CopyOps:
    """The copy and transpose work of a compiled program, as run per step: plain copy and
    transpose ops, and the fusions XLA names after them."""

    ops: int  # distinct instructions
    in_loop: int  # of them, inside a while body
    per_step: int  # executions per step (loop bodies times their trip count)
    bytes_per_step: int  # their output bytes, summed over executions
    unknown_trips: int  # while loops without a known trip count (counted once)


_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_RELAYOUT_OPS = ("copy", "transpose")
_RELAYOUT_NAME = re.compile(r"copy|transpose")


def _result_bytes(type_text: str) -> int:
    return sum(_array_bytes(type_text))


def copy_ops(hlo_text: str) -> CopyOps:
    """Copy and transpose ops, and fusions named after them, of an optimized HLO module,
    walked from ENTRY through while loops (times the loop's known trip count), calls and
    conditionals. Bytes are the ops' output bytes."""
    comps = computations(hlo_text)
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.M)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    ops = in_loop = per_step = nbytes = unknown = 0
    stack = [(entry.group(1), 1, False)]  # the call graph is acyclic
    while stack:
        name, mult, looped = stack.pop()
        if name not in comps:
            continue
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(2)
            if op == "while":
                trips = _TRIPS.search(line)
                unknown += trips is None
                n = mult * (int(trips.group(1)) if trips else 1)
                for key in ("body", "condition"):
                    called = re.search(rf"\b{key}=%?([\w.\-]+)", line)
                    if called:
                        stack.append((called.group(1), n, True))
                continue
            # XLA names a fusion after its hero ops (XLA:CPU copy_bitcast_fusion,
            # transpose_copy_fusion; XLA:GPU loop_transpose_fusion, input_convert_transpose_
            # fusion), as the profile's copy/transpose category does.
            hit = op in _RELAYOUT_OPS or (op == "fusion" and _RELAYOUT_NAME.search(
                line.split("=", 1)[0]) is not None)
            if op in ("call", "conditional", "async-start"):  # run as part of this one
                for group in _CALLS.findall(line):
                    stack.extend((n.strip().lstrip("%"), mult, looped)
                                 for n in group.split(",") if n.strip())
            if hit:
                ops += 1
                in_loop += looped
                per_step += mult
                nbytes += mult * _result_bytes(m.group(1))
    return CopyOps(ops, in_loop, per_step, nbytes, unknown)
