"""Fingerprints of a checkpoint's tensors, and the checks that what a restore reads is what
was saved.

Every save records, per leaf of the train state, two 32-bit checksums of the raw bits and
whether every value is finite (the checkpoint's `integrity` item, JSON). They are computed
on device where the state lives. A restore recomputes them: `train` on device for the whole
state, the tools on the host for each param they read.

The checksums are integer sums that wrap at 2**32: `sum` adds the leaf's words (a float32
is one word; a bfloat16 half of one, zero-extended), `weighted` adds each word times an odd
hash of its flat position. Integer addition does not depend on the order of the reduction,
so the figures are exact on any mesh and device count, and the weights catch values that
moved, which a plain sum would not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1
_MULT = 0x9E3779B1  # odd: position -> weight is a bijection mod 2**32
_HOST_CHUNK = 1 << 22  # elements per host pass, so a large leaf needs no full-size temporaries


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names its step and what to do."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, unreadable, or hold other values than were saved
    (checksum mismatch) or non-finite values."""


def leaf_name(path) -> str:
    """'params/layers/mlp/up_proj' for a pytree key path (dicts, dataclasses, tuples)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _word_dtype(dtype) -> tuple:
    size = np.dtype(dtype).itemsize
    if size not in (1, 2, 4):
        raise TypeError(f"no checksum for {np.dtype(dtype)} (itemsize {size})")
    return {1: (jnp.uint8, np.uint8), 2: (jnp.uint16, np.uint16),
            4: (jnp.uint32, np.uint32)}[size]


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _device_leaf(x):
    """(sum, weighted, finite) of one array, on device."""
    words = jax.lax.bitcast_convert_type(x, _word_dtype(x.dtype)[0]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):  # row-major flat index, wrapping like the host's
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= x.shape[axis]
    weight = index * jnp.uint32(_MULT) + jnp.uint32(1)
    finite = jnp.all(jnp.isfinite(x)) if _is_float(x.dtype) else jnp.bool_(True)
    return (jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weight, dtype=jnp.uint32),
            finite)


@jax.jit
def _device_leaves(leaves):
    return [_device_leaf(x) for x in leaves]


def device_fingerprint(tree) -> dict:
    """{leaf name: {"shape", "dtype", "sum", "weighted", "finite"}} of a pytree of (sharded)
    jax arrays; one small host transfer."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_device_leaves([x for _, x in flat]))
    return {leaf_name(p): {"shape": list(x.shape), "dtype": str(np.dtype(x.dtype)),
                           "sum": int(s), "weighted": int(w), "finite": bool(f)}
            for (p, x), (s, w, f) in zip(flat, sums)}


def host_fingerprint(x: np.ndarray) -> dict:
    """The same figures as `device_fingerprint` for one host array, in chunks."""
    shape = list(np.shape(x))
    x = np.ascontiguousarray(x)  # (0-d arrays come back 1-d: hence `shape` above)
    flat = x.reshape(-1)
    words_of = flat.view(_word_dtype(x.dtype)[1])
    total = weighted = np.uint32(0)
    finite = True
    for start in range(0, flat.size, _HOST_CHUNK):
        stop = min(start + _HOST_CHUNK, flat.size)
        words = words_of[start:stop].astype(np.uint32)
        index = np.arange(start, stop, dtype=np.uint64).astype(np.uint32)
        with np.errstate(over="ignore"):
            weight = index * np.uint32(_MULT) + np.uint32(1)
            total = np.uint32(total + words.sum(dtype=np.uint32))
            weighted = np.uint32(weighted + (words * weight).sum(dtype=np.uint32))
        if finite and _is_float(x.dtype):
            finite = bool(np.isfinite(flat[start:stop]).all())
    return {"shape": shape, "dtype": str(x.dtype), "sum": int(total),
            "weighted": int(weighted), "finite": finite}


def nonfinite_leaves(fingerprint: dict) -> list[str]:
    return [name for name, f in fingerprint.items() if not f["finite"]]


def compare(saved: dict, actual: dict) -> str | None:
    """Why `actual` (a fingerprint of what was read) is not what `saved` recorded, or None.
    Only the leaves both hold are compared (a tool may read the params alone)."""
    bad_values = nonfinite_leaves(actual)
    if bad_values:
        return f"{bad_values[0]} holds NaN or inf" + (
            f" (and {len(bad_values) - 1} more tensors)" if len(bad_values) > 1 else "")
    changed = [name for name, a in actual.items() if name in saved
               and any(saved[name][k] != a[k] for k in ("shape", "dtype", "sum", "weighted"))]
    if changed:
        return (f"{changed[0]} reads back other bytes than were saved (checksum mismatch)"
                + (f", and {len(changed) - 1} more tensors" if len(changed) > 1 else ""))
    return None


@dataclasses.dataclass
class Integrity:
    """The `integrity` item of a step: fingerprints plus the run's skip counters; with LoRA
    also the frozen base's {"path", "fingerprint"} (lora_base.py)."""

    tensors: dict
    nonfinite_total: int = 0
    lora_base: dict | None = None

    def to_json(self, step: int) -> dict:
        out = {"format": FORMAT, "step": step, "tensors": self.tensors,
               "nonfinite_total": self.nonfinite_total}
        if self.lora_base is not None:
            out["lora_base"] = self.lora_base
        return out

    @classmethod
    def from_json(cls, data: dict) -> Integrity:
        if not isinstance(data, dict) or data.get("format") != FORMAT \
                or not isinstance(data.get("tensors"), dict):
            raise ValueError(f"unknown integrity record (format {data.get('format')!r})"
                             if isinstance(data, dict) else "integrity record is not a mapping")
        return cls(tensors=data["tensors"], nonfinite_total=int(data.get("nonfinite_total", 0)),
                   lora_base=data.get("lora_base"))
