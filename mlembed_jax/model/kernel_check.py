"""The start-up check of an attention kernel on a run's own devices, and the kernel chosen
with it for those devices (mlembed_jax/attention_choice.py applies the choice to a run config).

The check ("probe") runs the kernel and the `dense` reference on the same packed rows (two
rows of the run's seq_len, several texts each, then padding), with the run's heads, kv
heads, head_dim and compute dtype, on the run's first local device, and compares outputs and
gradients over the real tokens. A kernel passes when both relative errors are within
PROBE_TOLERANCE for its dtype and everything is finite; a kernel that fails to compile or
run fails the check with its error's first line. "auto" then moves on to the next candidate
and the run's log says which kernel was passed over and why (kernel_choice.Choice.line).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax.model import attention
from mlembed_jax.model.kernel_choice import AUTO, Choice, Probe, auto_candidates, choose

# Relative error ||kernel - dense (fp32)|| / ||dense (fp32)|| allowed, outputs and gradients:
# about 10x what bf16 rounding alone costs (README "Benchmark" has the errors). A
# mask or layout bug moves whole texts' outputs: errors of order 1e-1 or more.
PROBE_TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-3}


def probe_rows(seq_len: int, rows: int = 2, seed: int = 0) -> np.ndarray:
    """[rows, seq_len] int32 segment ids: texts of uneven lengths, then padding (0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        col, text = 0, 1
        while True:
            n = int(rng.integers(max(seq_len // 8, 1), max(seq_len // 3, 2)))
            if col + n > seq_len - max(seq_len // 10, 1):
                break
            seg[r, col:col + n] = text
            col, text = col + n, text + 1
    return seg


def probe(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int, seq_len: int,
          dtype: str, device=None) -> str | None:
    """None if kernel `name` matches `dense` (outputs and gradients) on `device` for these
    shapes, else why not (one line)."""
    device = device or jax.local_devices()[0]
    seg = probe_rows(seq_len)
    rng = np.random.default_rng(1)
    shapes = ((2, seq_len, num_heads, head_dim), (2, seq_len, num_kv_heads, head_dim),
              (2, seq_len, num_kv_heads, head_dim))
    qkv = [jax.device_put(jnp.asarray(rng.normal(size=s), dtype), device) for s in shapes]
    real = seg > 0
    cot = jax.device_put(jnp.asarray(rng.normal(size=shapes[0]) * real[..., None, None],
                                     jnp.float32), device)
    seg_d = jax.device_put(jnp.asarray(seg), device)

    def out_and_grads(fn, q, k, v):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg_d).astype(jnp.float32) * cot)
        return fn(q, k, v, seg_d), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    try:
        got = jax.jit(lambda q, k, v: out_and_grads(attention.get_attention(name), q, k, v))(
            *qkv)
        got = jax.device_get(got)
    except Exception as e:  # noqa: BLE001 - any failure to compile or run is the finding
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    f32 = [x.astype(jnp.float32) for x in qkv]
    want = jax.device_get(jax.jit(lambda q, k, v: out_and_grads(
        attention.dense_masked_attention, q, k, v))(*f32))
    tol = PROBE_TOLERANCE.get(dtype, PROBE_TOLERANCE["bfloat16"])
    pairs = [("output", got[0], want[0], real)] + [
        (f"d{n}", g, w, None) for n, g, w in zip("qkv", got[1], want[1])]
    for what, g, w, where in pairs:
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if where is not None:
            g, w = g[where], w[where]
        if not np.isfinite(g).all():
            return f"{what} is not finite"
        err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
        if err > tol:
            return f"{what} differs from dense by {err:.2e} (relative; tolerance {tol:g})"
    return None


def choose_for_devices(requested: str, model_cfg, seq_len: int, devices, *,
                       check: bool = True, probe: Probe | None = None) -> Choice:
    """kernel_choice.choose for these devices (ValueError naming the fix for a kernel that
    cannot serve them). check: run the start-up probe on this process's first device of them
    (False for an AOT compile: the devices are described, not attached). probe: used instead
    of the start-up probe when given. With several processes, all use the most portable
    kernel any of them chose, so every process compiles the same program."""
    devices = list(devices)
    platform = devices[0].platform
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    capability = getattr(local[0], "compute_capability", None)
    run_probe = probe
    if check and probe is None:
        run_probe = lambda name: probe(
            name, num_heads=int(model_cfg.num_heads), num_kv_heads=int(model_cfg.num_kv_heads),
            head_dim=int(model_cfg.head_dim), seq_len=seq_len,
            dtype=str(model_cfg.compute_dtype), device=local[0])
    choice = choose(requested, platform, seq_len, compute_capability=capability,
                    probe=run_probe)
    if check and requested == AUTO and jax.process_count() > 1:
        choice = _agree(choice, [n for n, _ in auto_candidates(platform, capability)])
    return choice


def _agree(choice: Choice, candidates: list[str]) -> Choice:
    # Candidates run fastest to most portable (dense last): the latest any process chose
    # is one every process can run.
    from jax.experimental import multihost_utils  # only multi-process runs need it

    mine = candidates.index(choice.kernel)
    agreed = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    if agreed == mine:
        return choice
    return Choice(candidates[agreed], AUTO, f"another process could not use {choice.kernel}; "
                  "every process runs the same kernel", choice.passed_over)

