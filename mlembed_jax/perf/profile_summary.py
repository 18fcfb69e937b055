"""Where device time goes, from a `jax.profiler` trace, as plain-text markdown tables.

    jax.profiler.start_trace(d, create_perfetto_trace=True); ...; jax.profiler.stop_trace()
    print(format_summary(op_times(find_trace(d), module_contains="train_step")))

Reads the Chrome-format trace (`ph: "X"` events, `ts`/`dur` in microseconds) and sums the
events that XLA tags with `args.hlo_op`, so no xprof/TensorBoard is needed.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass, field

# First match wins, so the more specific categories come first: flash-attention kernels
# are often cutlass templates and would otherwise count as matmul.
CATEGORIES = {
    "collective": ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                   "collective-permute", "nccl"),
    "attention": ("attention", "fmha", "flash", "mosaic", "splash", "mha", "cudnn"),
    "matmul": ("gemm", "cublas", "cutlass", "dot", "matmul", "nvjet"),
    # XLA:CPU hands its dots, and reductions fused with them, to YNNPACK as ynn_fusion ops.
    "ynn (CPU dots, reductions)": ("ynn_fusion",),
    "copy/transpose": ("copy", "transpose"),
    # XLA:CPU materialises zero-filled buffers (e.g. a scan's stacked per-layer outputs).
    "broadcast": ("wrapped_broadcast",),
}
OTHER = "other fusion/op"


def category(*names: str) -> str:
    """Coarse category of an op from its hlo_op and/or kernel names (case-insensitive)."""
    text = " ".join(names).lower()
    return next((c for c, keys in CATEGORIES.items() if any(k in text for k in keys)), OTHER)


@dataclass
class OpStat:
    calls: int = 0
    us: float = 0.0      # summed duration, microseconds
    kernel: str = ""     # first event name seen (the CUDA kernel on GPU)


@dataclass
class OpTimes:
    ops: dict[str, OpStat] = field(default_factory=dict)  # hlo_op -> stats
    total_us: float = 0.0   # sum of all op durations
    span_us: float = 0.0    # first op start to last op end
    processes: list[str] = field(default_factory=list)  # trace processes the ops came from
    modules: dict[str, float] = field(default_factory=dict)  # hlo_module -> summed us


def find_trace(profile_dir: str) -> str:
    """Newest perfetto_trace.json.gz (else *.trace.json.gz) under profile_dir; a file is
    returned as is."""
    if os.path.isfile(profile_dir):
        return profile_dir
    if not os.path.isdir(profile_dir):
        raise FileNotFoundError(f"no such profile directory or trace file: {profile_dir}")
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
        found = glob.glob(os.path.join(profile_dir, "**", pattern), recursive=True)
        if found:
            return max(found, key=lambda p: (os.path.getmtime(p), p))
    raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under {profile_dir}")


def op_times(trace_path: str, module_contains: str | None = None) -> OpTimes:
    """Per-hlo_op call counts and durations of the XLA op events in one trace.

    Only device processes ("/device:...") count when the trace has any, since on GPU the
    host also logs launch-side events; a CPU trace has only "/host:CPU", so all of it counts.
    Device events without an hlo_op tag (CUDA graphs) are keyed by their kernel name.
    Raises ValueError when no event matches.
    """
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    complete = [e for e in events if e.get("ph") == "X"]
    ops = [e for e in complete if "hlo_op" in (e.get("args") or {})]
    on_device = [e for e in ops if procs.get(e["pid"], "").startswith("/device:")]
    if not on_device:
        # Kernels launched inside CUDA graphs can lose their hlo_op tag; key them by kernel
        # name then, rather than falling back to host-side events.
        on_device = [dict(e, args={**(e.get("args") or {}), "hlo_op": e["name"]})
                     for e in complete if procs.get(e["pid"], "").startswith("/device:")
                     and e.get("dur", 0) > 0]
    ops = on_device or ops
    if module_contains is not None:
        ops = [e for e in ops if module_contains in e["args"].get("hlo_module", "")]
    if not ops:
        where = f" with hlo_module containing {module_contains!r}" if module_contains else ""
        raise ValueError(f"no XLA op events{where} in {trace_path}")
    out = OpTimes(processes=sorted({procs.get(e["pid"], str(e["pid"])) for e in ops}))
    for e in ops:
        s = out.ops.setdefault(e["args"]["hlo_op"], OpStat(kernel=e.get("name", "")))
        s.calls += 1
        s.us += e["dur"]
        m = e["args"].get("hlo_module", "?")
        out.modules[m] = out.modules.get(m, 0.0) + e["dur"]
    out.total_us = sum(s.us for s in out.ops.values())
    out.span_us = max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)
    return out


def _short(s: str, n: int = 60) -> str:
    s = s if len(s) <= n else s[: n - 3] + "..."
    return s.replace("|", "\\|")  # a C++ template name must not split the markdown row


def format_summary(t: OpTimes, top: int = 20) -> str:
    """Markdown: the `top` ops by total time, a per-category table, then total/span/busy."""
    pct = lambda us: 100 * us / t.total_us if t.total_us else 0.0
    ranked = sorted(t.ops.items(), key=lambda kv: -kv[1].us)
    mods = sorted(t.modules.items(), key=lambda kv: -kv[1])
    lines = ["modules: " + ", ".join(f"{m} ({pct(us):.1f}%)" for m, us in mods), "",
             "| op | category | calls | total ms | % op time | example kernel |",
             "|---|---|---:|---:|---:|---|"]
    for op, s in ranked[:top]:
        lines.append(f"| {_short(op)} | {category(op, s.kernel)} | {s.calls} | "
                     f"{s.us / 1e3:.3f} | {pct(s.us):.1f}% | {_short(s.kernel)} |")
    if len(ranked) > top:
        lines.append(f"| ({len(ranked) - top} more ops) | | | | | |")
    cats: dict[str, list] = {}
    for op, s in ranked:
        c = cats.setdefault(category(op, s.kernel), [0, 0.0])
        c[0] += s.calls
        c[1] += s.us
    lines += ["", "| category | calls | total ms | % op time |", "|---|---:|---:|---:|"]
    for c, (calls, us) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {c} | {calls} | {us / 1e3:.3f} | {pct(us):.1f}% |")
    # Overlapping streams/threads (and several devices) can push busy past 1; it is
    # reported, not clipped.
    busy = t.total_us / t.span_us if t.span_us else float("nan")
    lines += ["", f"op time {t.total_us / 1e3:.3f} ms over span {t.span_us / 1e3:.3f} ms: "
                  f"busy {busy:.2f} (summed over {', '.join(t.processes)})"]
    return "\n".join(lines)
