"""Load a local Hugging Face Qwen3 directory (config.json + safetensors) into our params.

Reads only JSON and safetensors: never pickle, never code from the model directory. Tensors
are streamed one at a time into preallocated stacked arrays, so host memory holds the model
once. Every problem (missing, extra or misshapen tensors) is collected and reported together.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import ml_dtypes
import numpy as np

from mlembed_jax import storage
from mlembed_jax.model import hf_names
from mlembed_jax.model.factorized_embed import svd_factors
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.model.safetensors_io import SafetensorsError, SafetensorsFile

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint directory we cannot load; the message says what and how to fix it."""


def read_hf_config(model_dir: str) -> dict:
    """config.json of a Qwen3 directory, checked to be a model this encoder reproduces."""
    storage.check_location(model_dir, "HF model directory")
    if not storage.isdir(model_dir):
        raise CheckpointError(f"HF model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not storage.isfile(path):
        raise CheckpointError(f"{model_dir!r} has no config.json; is it a Hugging Face model "
                              "directory?")
    hf = json.loads(storage.read_text(path))
    if hf.get("model_type") != "qwen3":
        raise CheckpointError(f"{path}: model_type is {hf.get('model_type')!r}, but mlembed_jax "
                              "loads Qwen3 models only (model_type 'qwen3')")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (Qwen3 uses 'silu')")
    if hf.get("attention_bias", False):
        problems.append("attention_bias=true (Qwen3 has no attention bias)")
    if hf.get("use_sliding_window", False):
        problems.append("use_sliding_window=true (the encoder attends over the whole text)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope} (only the default RoPE is implemented)")
    if problems:
        raise CheckpointError(f"{path}: unsupported Qwen3 variant: " + "; ".join(problems))
    return hf


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))


def hf_model_fields(hf: dict) -> dict:
    """The model-shape fields of our config, read off an HF config.json."""
    heads = hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "rope_theta": _rope_theta(hf),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def encoder_config_from_hf(model_dir: str, **options) -> EncoderConfig:
    """An EncoderConfig with the directory's shapes; `options` set MEL, dtypes, exits, etc."""
    return EncoderConfig(**hf_model_fields(read_hf_config(model_dir)), **options)


def check_shape_matches(model_dir: str, cfg: EncoderConfig, allow_fewer_layers=False) -> None:
    """Raises CheckpointError listing every shape field where the run config and the
    checkpoint disagree (e.g. a checkpoint from another model size). With
    `allow_fewer_layers`, a config shallower than the checkpoint takes its first layers."""
    fields = hf_model_fields(read_hf_config(model_dir))
    if allow_fewer_layers and cfg.num_layers <= fields["num_layers"]:
        fields["num_layers"] = cfg.num_layers
    diffs = [f"{k}: checkpoint {v!r}, config {getattr(cfg, k)!r}"
             for k, v in fields.items() if k != "tie_word_embeddings" and getattr(cfg, k) != v]
    if diffs:
        raise CheckpointError(f"{model_dir!r} does not match the configured model shape "
                              f"({'; '.join(diffs)}); use the config for this checkpoint's "
                              "size, or override the model fields to match it")


def tensor_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> file path, for single or sharded safetensors checkpoints."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if storage.isfile(index):
        weight_map = json.loads(storage.read_text(index))["weight_map"]
        return {n: os.path.join(model_dir, fn) for n, fn in weight_map.items()}
    if storage.isfile(single):
        return {n: single for n in SafetensorsFile(single).names()}
    if any(storage.isfile(os.path.join(model_dir, n))
           for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CheckpointError(
            f"{model_dir!r} holds only pytorch_model.bin (pickle), which mlembed_jax never "
            "loads because unpickling can run code. Convert it once, in an environment you "
            "trust: AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{model_dir!r} has no model.safetensors or "
                          "model.safetensors.index.json")


def load_hf_params(model_dir: str, cfg: EncoderConfig, dtype: str | None = None,
                   allow_fewer_layers: bool = False,
                   on_read: Callable[[str, np.ndarray], None] | None = None) -> dict:
    """Params for `cfg` from an HF Qwen3 directory, as a nested dict of numpy arrays.

    With cfg.mel the pretrained embedding W is factorised by SVD into U [vocab, r_max] and
    V [r_max, embed]; W itself is not kept. `dtype` defaults to cfg.param_dtype. With
    `allow_fewer_layers`, a shallower cfg keeps the checkpoint's first cfg.num_layers layers
    (how configs/140m.py is cut from 0.6B). `on_read(name, array as stored)` sees every
    tensor of the directory once, those the import skips included (it reads them for it):
    a LoRA base is fingerprinted from the same read as its import.
    """
    check_shape_matches(model_dir, cfg, allow_fewer_layers)
    ckpt_layers = hf_model_fields(read_hf_config(model_dir))["num_layers"]
    files = tensor_files(model_dir)
    np_dtype = _NP_DTYPES[dtype or cfg.param_dtype]
    L = cfg.num_layers
    seen: dict[str, set[int]] = {}
    params: dict = {}
    problems: list[str] = []
    extra: list[str] = []
    embedding = None
    opened: dict[str, SafetensorsFile] = {}

    for name, path in files.items():
        short = hf_names.strip_prefix(name)
        found = hf_names.match(short)
        rule, layer = found if found is not None else (None, None)
        skip = found is None or (layer is not None and layer >= L)
        if found is None and short not in hf_names.IGNORED:
            extra.append(name)
        elif skip and layer is not None and layer >= ckpt_layers:
            extra.append(name)
        if skip and on_read is None:
            continue
        try:
            if path not in opened:
                opened[path] = SafetensorsFile(path)
            st = opened[path]
            if name not in st.names():
                problems.append(f"{name}: listed in the index but absent from {path}")
                continue
            shape = st.shape(name)
        except (SafetensorsError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        if skip:
            on_read(name, st.read(name))
            continue
        want = hf_names.hf_shape(rule, cfg)
        if shape != want:
            problems.append(f"{name}: shape {list(shape)}, expected {list(want)}")
            continue
        x = st.read(name)
        if on_read is not None:
            on_read(name, x)
        if rule.hf == "embed_tokens.weight" and cfg.mel:
            embedding = x
            seen.setdefault(rule.hf, set()).add(0)
            continue
        x = hf_names.to_ours(rule, x, cfg).astype(np_dtype)
        node = params
        for key in rule.ours[:-1]:
            node = node.setdefault(key, {})
        if layer is None:
            node[rule.ours[-1]] = x
        else:
            if rule.ours[-1] not in node:
                node[rule.ours[-1]] = np.empty((L,) + x.shape, np_dtype)
            node[rule.ours[-1]][layer] = x
        seen.setdefault(rule.hf, set()).add(layer if layer is not None else 0)

    missing = [n for n in hf_names.expected_hf_names(cfg)
               if (hf_names.match(n)[1] or 0) not in seen.get(hf_names.match(n)[0].hf, set())]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): " + ", ".join(extra[:20])
                        + (" ..." if len(extra) > 20 else ""))
    if problems:
        raise CheckpointError(f"cannot load {model_dir!r} as a {L}-layer Qwen3 encoder:\n  "
                              + "\n  ".join(problems))
    if cfg.mel:
        u, v = svd_factors(embedding, cfg.mel_r_max)
        del embedding
        params["embed_tokens"] = {"U": u.astype(np_dtype), "V": v.astype(np_dtype)}
    return params


@dataclasses.dataclass
class CheckpointSummary:
    """What `tools/inspect_hf.py` prints about a directory."""

    config: dict
    tensors: list[tuple[str, tuple[int, ...], str]]
    total_params: int
    embedding_params: int


def summarize(model_dir: str) -> CheckpointSummary:
    hf = read_hf_config(model_dir)
    tensors = []
    for name, path in sorted(tensor_files(model_dir).items()):
        st = SafetensorsFile(path)
        tensors.append((name, st.shape(name), str(st.dtype(name))))
    total = sum(int(np.prod(s)) for _, s, _ in tensors)
    emb = sum(int(np.prod(s)) for n, s, _ in tensors
              if hf_names.strip_prefix(n) in ("embed_tokens.weight", "lm_head.weight"))
    return CheckpointSummary(hf, tensors, total, emb)
