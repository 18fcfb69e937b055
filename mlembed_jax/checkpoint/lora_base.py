"""The frozen base of a LoRA checkpoint: its fingerprint, the check that a base is the one
the adapters were trained on, and merging the adapters into it on the host.

A LoRA run's state holds only the adapters; its base stays where train.init_from points
(an HF directory or another run's checkpoint). Each save records {"path", "fingerprint"} of
the base in the step's `integrity` item. The fingerprint is a SHA-256 over the per-tensor
checksums of verify.py of the base's files (`source_fingerprint`): a resume, an export or
a tool that would find another base at that path is refused.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from mlembed_jax import storage
from mlembed_jax.checkpoint.verify import CheckpointError, host_fingerprint


def digest(fingerprint: dict) -> str:
    """16 hex digits of SHA-256 over {tensor name: verify.py's figures of it}."""
    figures = {name: [f["shape"], f["dtype"], f["sum"], f["weighted"]]
               for name, f in fingerprint.items()}
    return hashlib.sha256(json.dumps(figures, sort_keys=True).encode()).hexdigest()[:16]


def source_fingerprint(path: str) -> str:
    """The `digest` of a base as stored at `path`: of an HF directory, every safetensors
    tensor's checksums (read one at a time); of a training checkpoint, the per-tensor
    checksums its save recorded for the params (plus its own base's, for adapters trained
    on adapters). From the files, not the imported params: an HF base with MEL is factorised
    by SVD on import, whose last bits may differ between machines. A run or tool that also
    imports the base gets this value from the same read (reader.lora_base_from)."""
    if storage.isfile(os.path.join(path, "config.json")):
        from mlembed_jax.model.hf_import import tensor_files  # the HF side, only here
        from mlembed_jax.model.safetensors_io import SafetensorsFile

        files: dict = {}
        figures = {}
        for name, fn in sorted(tensor_files(path).items()):
            f = files.setdefault(fn, SafetensorsFile(fn))
            figures[name] = host_fingerprint(f.read(name))
        return digest(figures)
    from mlembed_jax.checkpoint.reader import TrainedParams

    return checkpoint_digest(TrainedParams(path, quiet=True))


def checkpoint_digest(reader) -> str:
    """`source_fingerprint` of the training checkpoint a reader.TrainedParams has open: the
    recorded checksums; of a checkpoint saved without them, the figures of the params the
    reader has read (reading the rest now)."""
    if reader.integrity is None:  # saved before fingerprints: compute them
        figures = {"params/" + "/".join(p): reader.read_figures.get("params/" + "/".join(p))
                   or host_fingerprint(reader._read_saved(p)) for p in reader._saved_leaves}
    else:
        figures = {k: v for k, v in reader.integrity.tensors.items() if k.startswith("params/")}
    if reader.integrity is not None and reader.integrity.lora_base:
        figures["lora_base"] = {"shape": [], "dtype": "",
                                "sum": reader.integrity.lora_base["fingerprint"], "weighted": 0}
    return digest(figures)


def check_same_base(saved: dict | None, current: dict | None, where: str) -> None:
    """CheckpointError when the checkpoint at `where` was trained on another base than
    `current` (both {"path", "fingerprint"}; None: not a LoRA run / checkpoint)."""
    if saved is None and current is None:
        return
    if saved is None or current is None:
        what = "has no LoRA base record" if saved is None else "holds LoRA adapters"
        raise CheckpointError(f"checkpoint {where} {what}, but this run "
                              f"{'trains LoRA adapters' if saved is None else 'has LoRA off'}; "
                              "resume with the config it was saved with, or use a fresh "
                              "--workdir")
    if saved["fingerprint"] != current["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {where} holds LoRA adapters of the base {saved['path']} (fingerprint "
            f"{saved['fingerprint']}), not of {current['path']} (fingerprint "
            f"{current['fingerprint']}); use the base it was trained on (train.init_from), "
            "or a fresh --workdir")


def lora_settings(model_cfg) -> tuple[int, float, tuple[str, ...]] | None:
    """(rank, alpha, targets) of a saved config's model.lora, or None when LoRA is off."""
    lora = model_cfg.get("lora") if hasattr(model_cfg, "get") else None
    if lora is None or int(lora.get("rank", 0)) == 0:
        return None
    return int(lora["rank"]), float(lora["alpha"]), tuple(lora["targets"])


def adapted_leaf(path: tuple, targets) -> tuple[str, str] | None:
    """(module, target) when the param at `path` is an adapted kernel, else None."""
    if len(path) == 3 and path[0] == "layers" and path[2] in targets:
        return path[1], path[2]
    return None


def merge_leaf(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W [L, *in, *out] + scale * A [L, *in, r] @ B [L, r, *out], in fp32, in W's dtype: the
    host twin of model/lora.merge_adapters, one kernel at a time."""
    layers, r = a.shape[0], a.shape[-1]
    a2 = np.asarray(a, np.float32).reshape(layers, -1, r)
    b2 = np.asarray(b, np.float32).reshape(layers, r, -1)
    delta = np.matmul(a2, b2).reshape(w.shape)
    return (np.asarray(w, np.float32) + np.float32(scale) * delta).astype(w.dtype)
