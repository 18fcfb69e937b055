"""Embeddings written once and reused: a directory of embedding parts, keyed by content.

    store = EmbeddingStore(DIR, encoder, rank=64, exit=2, dim=128)   # DIR None: in memory
    emb = store.embed(ids, progress=True)     # ids: token-id arrays -> [n, dim] float32

The miner (tools/mine_negatives.py --cache_dir) and tools/eval_retrieval.py (--cache_dir)
embed through it: a corpus embedded by one is read back by the other, by a rerun, or by a
run on more texts (only the texts not in the store are encoded).

Layout of DIR:
  store.json          the model and the (rank, exit, dim) point the embeddings belong to
  part-<id>.npy       [m, dim] float32, L2-normalised
  part-<id>.keys.npy  [m] uint64: a hash of each text's token ids (prefix in, EOS last:
                      exactly what the model saw); written after its part, so a part counts
                      only once both files exist
New texts are written as a new part every `part_size` texts, so a killed run keeps what it
finished and a rerun goes on from there. A store made by another model (weights, shape,
tokenisation) or at another point is refused with what differs.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import uuid
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax.storage import save_npy_atomic as atomic_save_npy
from mlembed_jax.storage import write_bytes_atomic as atomic_write_bytes

STORE_VERSION = 1
DEFAULT_PART_SIZE = 65536  # texts per part: large enough to pack well, small enough to lose


class StoreError(ValueError):
    """A store that cannot serve this request; the message names the directory and the fix."""


def text_keys(ids: Sequence[np.ndarray]) -> np.ndarray:
    """[n] uint64: a 64-bit hash of each text's token ids (as int32)."""
    out = np.empty(len(ids), np.uint64)
    for i, t in enumerate(ids):
        digest = hashlib.blake2b(np.asarray(t, np.int32).tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def model_identity(encoder) -> dict:
    """What makes two models embed alike: shape and compute settings, tokenisation length
    and a hash of the weights (each leaf's shape and its first and last values, read on the
    device: a trained model differs from any other there)."""
    h = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_leaves_with_path(encoder.params)
    for path, leaf in leaves:
        flat = jnp.ravel(leaf)
        sample = np.asarray(jax.device_get(jnp.concatenate([flat[:512], flat[-512:]])),
                            np.float32)
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode())
        h.update(sample.tobytes())
    cfg = dataclasses.asdict(encoder.cfg)
    cfg.pop("remat", None)  # no effect on a forward pass
    return {"config": cfg, "max_seq_length": int(encoder.max_seq_length),
            "weights": h.hexdigest()}


class EmbeddingStore:
    """Content-keyed embeddings of one model at one (rank, exit, dim).

    path: the store's directory, or None for a store kept in memory (the same lookups,
    for one process: every distinct text is encoded once however often it is asked for).
    """

    def __init__(self, path: str | None, encoder, *, rank=None, exit=None, dim=None,
                 allow_untrained: bool = False, part_size: int = DEFAULT_PART_SIZE):
        self.path, self.encoder, self.part_size = path, encoder, int(part_size)
        self.allow_untrained = allow_untrained
        rank, exit, dim = encoder.check(rank, exit, dim, allow_untrained)
        self.point = {"rank": rank, "exit": exit, "dim": dim}
        self._parts: list[np.ndarray] = []  # [m, dim] each (memmaps on disk)
        self._part_keys: list[np.ndarray] = []
        self._part_names: list[str] = []  # file names, for error messages
        if path is not None:
            self._open(path)
        self._reindex()

    @property
    def dim(self) -> int:
        return self.point["dim"]

    def _open(self, path: str) -> None:
        """Checks (or writes) store.json, then reads every complete part."""
        meta = {"version": STORE_VERSION, "model": model_identity(self.encoder),
                "point": self.point, "source": os.path.abspath(self.encoder.source or "")}
        meta = json.loads(json.dumps(meta))  # as read back (tuples become lists)
        meta_path = os.path.join(path, "store.json")
        if os.path.isfile(meta_path):
            try:
                with open(meta_path) as f:
                    have = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise StoreError(f"{meta_path}: unreadable ({e}); delete the directory or "
                                 "choose another --cache_dir") from None
            diff = [k for k in ("version", "model", "point") if have.get(k) != meta[k]]
            if diff:
                what = {"version": "another store format", "model": "another model (weights, "
                        "shape or max_seq_length)", "point": f"point {have.get('point')}, "
                        f"not {self.point}"}
                raise StoreError(f"{path} holds embeddings of {'; '.join(what[k] for k in diff)}"
                                 f" (made from {have.get('source')!r}); choose another "
                                 "--cache_dir or delete it")
        else:
            try:
                os.makedirs(path, exist_ok=True)
                atomic_write_bytes(json.dumps(meta, indent=1).encode(), meta_path)
            except OSError as e:
                raise StoreError(f"cannot write the embedding store {path!r}: {e}") from None
        for kpath in sorted(glob.glob(os.path.join(path, "part-*.keys.npy"))):
            epath = kpath[:-len(".keys.npy")] + ".npy"
            try:
                keys = np.load(kpath)
                emb = np.load(epath, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise StoreError(f"{kpath}: unreadable part ({type(e).__name__}: {e}); delete "
                                 f"{os.path.basename(epath)} and its .keys.npy (their texts "
                                 "will be re-encoded)") from None
            if keys.ndim != 1 or emb.shape != (len(keys), self.dim):
                raise StoreError(f"{epath}: shape {emb.shape} does not match its {len(keys)} "
                                 f"keys x dim {self.dim}; delete the part (it will be "
                                 "re-encoded)")
            self._parts.append(emb)
            self._part_keys.append(keys)
            self._part_names.append(os.path.basename(epath))

    def _reindex(self) -> None:
        """Sorted keys of every part, and the (part, row) of each."""
        if not self._part_keys:
            self._keys = np.zeros(0, np.uint64)
            self._part_of = np.zeros(0, np.int32)
            self._row_of = np.zeros(0, np.int64)
            return
        keys = np.concatenate(self._part_keys)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._part_of = np.concatenate([np.full(len(k), i, np.int32)
                                        for i, k in enumerate(self._part_keys)])[order]
        self._row_of = np.concatenate([np.arange(len(k), dtype=np.int64)
                                       for k in self._part_keys])[order]

    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """[n] position in the sorted index of each key, -1 when absent."""
        if not len(self._keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[pos] == keys, pos, -1)

    def embed(self, ids: Sequence[np.ndarray], *, batch_tokens: int | None = None,
              progress: bool = False, desc: str = "encode") -> np.ndarray:
        """Token-id arrays (EOS last) -> [n, dim] float32, L2-normalised, in input order.
        Texts already in the store are read; the others are encoded and added."""
        keys = text_keys(ids)
        pos = self._find(keys)
        missing = np.flatnonzero(pos < 0)
        if len(missing):
            _, first = np.unique(keys[missing], return_index=True)
            todo = missing[np.sort(first)]  # each new text once, in input order
            kw = {} if batch_tokens is None else {"batch_tokens": batch_tokens}
            n_parts = -(-len(todo) // self.part_size)
            for i in range(n_parts):
                chunk = todo[i * self.part_size:(i + 1) * self.part_size]
                emb = self.encoder.encode_ids(
                    [ids[j] for j in chunk], **self.point, allow_untrained=self.allow_untrained,
                    progress=progress, desc=f"{desc} {i + 1}/{n_parts}" if n_parts > 1 else desc,
                    **kw)
                self._add_part(keys[chunk], emb)
            self._reindex()
            pos = self._find(keys)
        out = np.empty((len(ids), self.dim), np.float32)
        part_of, row_of = self._part_of[pos], self._row_of[pos]
        for p in np.unique(part_of):
            sel = np.flatnonzero(part_of == p)
            rows = row_of[sel]
            order = np.argsort(rows)  # memmaps read fastest in file order
            out[sel[order]] = self._parts[p][rows[order]]
        if not np.isfinite(out).all():  # new parts are checked by the encoder; old ones here
            bad = np.unique(part_of[~np.isfinite(out).all(axis=1)])
            names = [self._part_names[p] for p in bad]
            raise StoreError(f"{self.path}: {', '.join(names)} holds NaN/inf embeddings (written "
                             "by a diverged model); delete those parts and their .keys.npy "
                             "(their texts will be re-encoded)")
        return out

    def _add_part(self, keys: np.ndarray, emb: np.ndarray) -> None:
        emb, keys = np.asarray(emb, np.float32), np.asarray(keys, np.uint64)
        if self.path is not None:
            base = os.path.join(self.path, f"part-{uuid.uuid4().hex[:16]}")
            try:
                atomic_save_npy(emb, base + ".npy")
                atomic_save_npy(keys, base + ".keys.npy")  # written last: completes the part
            except OSError as e:
                raise StoreError(f"cannot write to the embedding store {self.path!r}: "
                                 f"{e}") from None
        self._parts.append(emb)
        self._part_keys.append(keys)
        self._part_names.append(os.path.basename(base + ".npy") if self.path else "memory")
