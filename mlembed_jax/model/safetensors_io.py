"""Minimal safetensors reader over a memory map: tensor-by-tensor, any dtype (bf16 too).

safetensors' own numpy loader rejects bfloat16; the format is simple enough (8-byte header
length, JSON header, raw little-endian data) to read directly, and a memory map means only
the tensor being converted is ever resident. A file at a URL (gs://) cannot be mapped: there
each tensor is one ranged read of its bytes, so still only that tensor is in memory.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from mlembed_jax import storage

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names the file and the problem."""


class SafetensorsFile:
    """Read-only view of one .safetensors file: `names()`, `shape(n)`, `dtype(n)`, `read(n)`."""

    def __init__(self, path: str):
        self.path = path
        try:
            with storage.open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{path}: file too short to be safetensors")
                (n,) = struct.unpack("<Q", head)
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, struct.error) as e:
            raise SafetensorsError(f"{path}: not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n
        remote = storage.is_url(path)
        self._mm = None if remote else np.memmap(path, dtype=np.uint8, mode="r")
        size = storage.size_and_version(path)[0] if remote else self._mm.size
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype "
                                       f"{info['dtype']}")
            end = self._data_start + info["data_offsets"][1]
            if end > size:
                raise SafetensorsError(f"{path}: truncated (tensor {name!r} ends at byte {end}, "
                                       f"file has {size})")

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._header[name]["dtype"]])

    def read(self, name: str) -> np.ndarray:
        info = self._header[name]
        start, end = (self._data_start + o for o in info["data_offsets"])
        if self._mm is not None:
            raw = self._mm[start:end]
        else:
            with storage.open(self.path, "rb") as f:
                f.seek(start)
                raw = np.frombuffer(f.read(end - start), np.uint8)
        return np.array(raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"]))


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Writes numpy arrays (bf16 included) as safetensors, one tensor at a time."""
    inv = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": inv[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header to 8 bytes
    with storage.open(path, "wb") as f:  # a URL: streamed up in blocks, never whole in RAM
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
