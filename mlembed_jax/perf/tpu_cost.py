"""The TPU compiler's own estimate of a step's time, from a deviceless compile.

After compiling for a libtpu topology, `compiled.cost_analysis()` holds `optimal_seconds`
beside `flops` and `bytes accessed`: XLA:TPU's roofline estimate of the program on one chip
(each op at the chip's peak compute or HBM bandwidth, whichever binds). It is a lower bound
on time, not a measurement: no stalls, no launch or collective latency beyond the model's.

Like the FLOPs, it counts the body of a loop once, so the scanned step's own figure leaves
out all but one of its layers. Scaling the loop body's share does not work either: compiled
with two layers per loop iteration (model.scan_unroll=2) the difference is the layer plus the
loop's bookkeeping on the stacked [layers, ...] buffers, which the cost model charges at
their full size (README "Performance"). So the step is compiled twice more as
straight-line programs, at 2 and at 3 layers (the loop fully unrolled, one exit each), and

    per step = T(2) + (loop layers - 2) x (T(3) - T(2))

where loop layers is num_layers (times train.grad_cache_chunks with cached gradients, whose
chunk loop also counts its body once). tests/test_aot.py checks it against the fully unrolled
full-depth program. The shallow copies score one MLL exit, not all of them, and a chunk's
embedding lookup and pooling stay counted once: both keep it a lower bound. The GPU compiler
offers no deviceless estimate.
"""

from __future__ import annotations

import dataclasses
import re
import time

OPTIMAL_SECONDS = "optimal_seconds"

# Custom calls XLA's cost analysis cannot see into count -1 s each (HloCostAnalysis'
# "unknown" marker) instead of their time. With libtpu 0.0.42 these are bookkeeping that
# moves no data worth counting: a crop of a zero-padded buffer, the start/done markers of
# work offloaded to the SparseCores, and (v6e, around splash) ConcatBitcast, which joins
# the results of async slices into one buffer in place: the slices' copies are costed
# ops of their own; in a multi-slice program, SliceId, which reads this slice's index (a
# scalar). Their -1s are added back; any other negative total is refused. The
# splash kernel itself (tpu_custom_call) carries Pallas' cost estimate and counts as time.
ZERO_COST_CUSTOM_CALLS = ("ZeroCrop", "PrepareAsyncCallStart", "PrepareAsyncCallDone",
                          "ConcatBitcast", "SliceId")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def unknown_cost_calls(hlo_text: str) -> int:
    """How many instructions of the compiled HLO are custom calls in ZERO_COST_CUSTOM_CALLS."""
    return sum(t in ZERO_COST_CUSTOM_CALLS for t in _CUSTOM_CALL.findall(hlo_text))


def optimal_seconds(compiled, hlo_text: str | None = None) -> float | None:
    """XLA:TPU's `optimal_seconds` of a compiled program (summed over its entries), with the
    -1 markers of ZERO_COST_CUSTOM_CALLS taken out; None when the backend gives none
    (XLA:CPU, XLA:GPU). Raises ValueError when it stays negative (a custom call of unknown
    cost that is not bookkeeping, e.g. a kernel: the estimate would leave its time out)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis: no estimate
        return None
    entries = cost if isinstance(cost, (list, tuple)) else [cost]
    values = [e[OPTIMAL_SECONDS] for e in entries if e and OPTIMAL_SECONDS in e]
    if not values:
        return None
    text = compiled.as_text() if hlo_text is None else hlo_text
    seconds = float(sum(values)) + unknown_cost_calls(text)
    if seconds < 0:
        targets = sorted(set(_CUSTOM_CALL.findall(text)) - set(ZERO_COST_CUSTOM_CALLS))
        raise ValueError(f"XLA:TPU gave no cost for some custom call of the program (its "
                         f"optimal_seconds is {seconds:.3g} s after the known ones); custom "
                         f"calls present: {targets}")
    return seconds


SHALLOW = (2, 3)  # the depths of the straight-line copies


def per_step_seconds(t_shallow: float, t_deeper: float, num_layers: int,
                     depths: tuple[int, int] = SHALLOW, chunks: int = 1
                     ) -> tuple[float, float]:
    """(per-step seconds, per-layer seconds) from the estimates of the straight-line copies
    at `depths` layers. chunks: the cached-gradient chunk loop's trip count."""
    lo, hi = depths
    layer = (t_deeper - t_shallow) / (hi - lo)
    return t_shallow + (chunks * num_layers - lo) * layer, layer


def shallow_config(config, num_layers: int):
    """A copy of the run config at `num_layers` layers, one exit (the last), the layer loop
    fully unrolled: a straight-line program whose cost analysis counts every layer."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.num_layers = int(num_layers)
        c.model.exits = (int(num_layers),)
        c.model.scan_unroll = int(num_layers)
    return c


@dataclasses.dataclass
class Prediction:
    seconds: float  # per step, every layer counted
    scanned: float  # the compiled program's own figure (loop bodies once)
    layer: float  # one layer's forward + backward (+ recompute), per chip
    num_layers: int
    chunks: int
    compile_s: float  # the two straight-line copies


def predict(config, devices, compiled, num_datasets: int = 1, hlo_text: str | None = None
            ) -> Prediction | str | None:
    """The per-step estimate for the step `compiled` (aot.build_lowered of `config` on
    `devices`; hlo_text: its text if already printed), from its straight-line copies at
    SHALLOW layers. None when the compiler gives no estimate (not a TPU); a string saying
    why when it gives one that cannot be used."""
    from mlembed_jax.perf import aot  # imports JAX: only once the target's environment is set

    try:
        scanned = optimal_seconds(compiled, hlo_text)
        if scanned is None:
            return None
        t0 = time.time()
        shallow = []
        for depth in SHALLOW:
            built = aot.build_lowered(shallow_config(config, depth), devices, num_datasets)
            shallow.append(optimal_seconds(built.lowered.compile()))
        compile_s = time.time() - t0
    except Exception as e:  # noqa: BLE001 - the estimate is extra: the report still stands
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    if None in shallow:
        return None
    chunks = max(int(built.step.setup.grad_cache_chunks or 1), 1)
    layers = int(config.model.num_layers)
    seconds, layer = per_step_seconds(*shallow, layers, SHALLOW, chunks)
    return Prediction(seconds, scanned, layer, layers, chunks, compile_s)


def report_lines(pred: Prediction | str, flops: dict, num_devices: int,
                 peak_flops: float | None) -> list[str]:
    """The report's lines. pred: the prediction, or why there is none. flops:
    aot.hand_flops of the step (its "mix" FLOPs and "mix_tokens" useful tokens)."""
    if isinstance(pred, str):
        return [f"predicted step time (XLA:TPU cost analysis): unavailable: {pred}"]
    loops = f"{pred.num_layers} layers" + (f" x {pred.chunks} chunks" if pred.chunks > 1
                                           else "")
    lines = [
        "predicted step time (XLA:TPU cost analysis, optimal_seconds: a roofline-type LOWER "
        "BOUND on time, not a measurement):",
        f"  per step: {pred.seconds:.3g} s: {pred.layer * 1e3:.3g} ms per layer "
        f"(forward + backward) x {loops}, plus the rest; from straight-line copies at "
        f"{SHALLOW[0]} and {SHALLOW[1]} layers (compiled in {pred.compile_s:.0f} s). The "
        f"scanned program alone says {pred.scanned:.3g} s: it counts its loop bodies once",
        f"  useful tokens/s at that time: {flops['mix_tokens'] / pred.seconds:,.0f} "
        "(benchmark length mix)",
    ]
    if peak_flops:
        mfu = flops["mix"] / (pred.seconds * num_devices * peak_flops)
        lines.append(f"  MFU on useful tokens at that time: {100 * mfu:.1f}% (hand-counted "
                     "FLOPs above; an upper bound, as the time is a lower bound)")
    if pred.chunks > 1:
        lines.append("  (each chunk's embedding lookup and pooling are counted once: the bound "
                     "stays a lower one)")
    lines.append("  (no GPU compiler gives such an estimate without a device)")
    return lines
