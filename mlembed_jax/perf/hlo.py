"""Reading a compiled XLA program: per-device memory, XLA's FLOP count, and its collectives.

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


def memory_line(compiled) -> str:
    """One line of per-device memory for a log, saying so when the backend has none."""
    m = memory(compiled)
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 2 ** 30
    return (f"per device: arguments {m.argument / gib:.3f} GiB, outputs {m.output / gib:.3f} "
            f"GiB, temporaries {m.temp / gib:.3f} GiB, aliased {m.alias / gib:.3f} GiB")
