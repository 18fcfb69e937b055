"""A trained checkpoint -> a Hugging Face Qwen3 directory at a chosen 3D-ML size (R, K, M).

Output (DIR):
  config.json                 Qwen3Model, num_hidden_layers = K (final norm kept)
  model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  mel_factors.safetensors     factorized mode only: embed_tokens.U [vocab, R], .V [R, d]
  tokenizer.json, tokenizer_config.json        appends EOS as training did (tokenizer_files)
  modules.json, sentence_bert_config.json, 1_Pooling/, 2_Normalize/,
  config_sentence_transformers.json            (sentence_transformers_files)
  README.md                   model card (model_card)

Weights stream: one checkpoint leaf is restored at a time, cut into HF tensors and written a
shard at a time, so host memory holds one leaf plus one shard, never the model twice. The
directory is built under a temporary name and renamed when complete. Each tensor is checked
after MEL folding and the cast to the export dtype: NaN/inf (a diverged run's weights
overflow) is an ExportError naming the checkpoint and its intact alternatives, and the
temporary directory is removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import ml_dtypes
import numpy as np

from mlembed_jax import storage
from mlembed_jax.checkpoint.reader import ToolParams, TrainedParams, alternatives_hint
from mlembed_jax.export.errors import ExportError, ExportWarning
from mlembed_jax.export.model_card import final_metrics, render
from mlembed_jax.export.peft_files import ADAPTER_DIR, BASE_DIR, write_adapter_dir
from mlembed_jax.export.sentence_transformers_files import (
    prompts_from_manifest,
    write_sentence_transformers_files,
)
from mlembed_jax.export.tokenizer_files import check_same_ids, write_tokenizer
from mlembed_jax.export.training_sources import training_sources
from mlembed_jax.model import hf_names
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.model.safetensors_io import write_safetensors
from mlembed_jax.recipe import TrainedPoints, model_exits, resolve_point

__all__ = ["ExportError", "ExportWarning", "Cut", "choose_cut", "export_checkpoint", "fold_mel",
           "hf_config"]

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}
MODES = ("compat", "factorized")
MAX_SHARD_BYTES = 2 << 30  # small shards bound the export's host memory (HF's default is 5GB)
FACTORS_FILE = "mel_factors.safetensors"
# Qwen3's context length, used when the run did not start from an HF config that says.
QWEN3_MAX_POSITIONS = 40960


@dataclasses.dataclass(frozen=True)
class Cut:
    """The 3D-ML size of an export: MEL rank R (None without MEL), layers K, output dim M."""

    rank: int | None
    layers: int
    dim: int


def choose_cut(enc: EncoderConfig, mrl_min_dim: int, rank=None, layers=None, dim=None) -> Cut:
    """Checks the requested (R, K, M) = (rank, exit, dim) against the trained model; None
    means the full size.

    Raises ExportError listing every impossible choice; warns (ExportWarning) for a choice the
    model can run but was not trained for (a depth that is no MLL exit, a rank outside the MEL
    rank set, a width that is no MRL dim): recipe.resolve_point decides which is which.
    """
    check = resolve_point(TrainedPoints.of(enc, mrl_min_dim), rank, layers, dim)
    flag = {"rank": f"--rank {rank}", "exit": f"--exit {layers}", "dim": f"--dim {dim}"}
    if check.impossible:
        raise ExportError("cannot export this size:\n  " + "\n  ".join(
            f"{flag[a]}: {m}" for a, m in check.impossible.items()))
    for axis, note in check.untrained.items():
        warnings.warn(f"exporting anyway: {flag[axis]}: {note}; its embeddings were never "
                      "trained to be used", ExportWarning, stacklevel=3)
    p = check.point
    return Cut(rank=p.rank, layers=p.exit, dim=p.dim)


def fold_mel(u: np.ndarray, v: np.ndarray, rank: int, dtype=np.float32,
             rows_per_chunk: int = 16384) -> np.ndarray:
    """U [vocab, r_max], V [r_max, d] -> W = U[:, :rank] @ V[:rank] as [vocab, d] `dtype`.

    Multiplies in fp32, a block of rows at a time, so W (in its output dtype) is the only
    full-size array made.
    """
    v = np.asarray(v[:rank], np.float32)
    out = np.empty((u.shape[0], v.shape[1]), dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # the export checks for inf instead
        for s in range(0, u.shape[0], rows_per_chunk):
            out[s:s + rows_per_chunk] = np.asarray(u[s:s + rows_per_chunk, :rank],
                                                   np.float32) @ v
    return out


def _check_finite(name: str, x: np.ndarray, reader: TrainedParams, how: str) -> None:
    """ExportError when the tensor about to be written holds NaN/inf: weights that overflow
    the export dtype (or the MEL product) must not leave as a model."""
    finite = np.isfinite(x)
    if finite.all():
        return
    n = int(finite.size - np.count_nonzero(finite))
    raise ExportError(
        f"checkpoint {reader.step_dir} (step {reader.step}): {name} holds {n} of {x.size} "
        f"values that are inf or NaN {how} (its weights are too large: the run diverged); "
        "nothing was written; " + alternatives_hint(reader.ckpt_dir, reader.step,
                                                    "--model"))


def hf_config(enc: EncoderConfig, layers: int, dtype: str, special: dict,
              max_position_embeddings: int) -> dict:
    """config.json of a K-layer Qwen3Model with the trained model's shapes."""
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    return {
        "architectures": ["Qwen3Model"],
        "model_type": "qwen3",
        "vocab_size": enc.vocab_size,
        "hidden_size": enc.hidden_size,
        "intermediate_size": enc.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": enc.num_heads,
        "num_key_value_heads": enc.num_kv_heads,
        "head_dim": enc.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": enc.rms_norm_eps,
        "rope_theta": enc.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "tie_word_embeddings": enc.tie_word_embeddings,  # as the backbone had it
        "initializer_range": 0.02,
        "use_cache": False,  # an encoder: one forward pass, no generation
        "bos_token_id": None,
        "eos_token_id": special["eos_token_id"],
        "pad_token_id": special["pad_token_id"],
        "torch_dtype": torch_dtype,  # transformers 4 reads this key ...
        "dtype": torch_dtype,  # ... transformers 5 this one
    }


def _max_positions(config, max_seq_length: int) -> int:
    """max_position_embeddings of the HF model training started from, if it is at hand."""
    init = config.train.get("init_from", "")
    n = QWEN3_MAX_POSITIONS
    if init and storage.isfile(os.path.join(init, "config.json")):
        n = int(json.loads(storage.read_text(os.path.join(init, "config.json"))).get(
            "max_position_embeddings", n))
    return max(n, max_seq_length)


# ----------------------------------------------------------------------------- weights
def _tensor_order(num_layers: int) -> list[tuple[str, hf_names.NameRule, int | None]]:
    """(HF name, rule, layer) in writing order: embedding, final norm, then each per-layer
    tensor for layers 0..K-1, so every checkpoint leaf is read once and released."""
    order = []
    for rule in hf_names.RULES:
        if rule.per_layer:
            order += [(rule.hf.format(i=i), rule, i) for i in range(num_layers)]
        else:
            order.append((rule.hf, rule, None))
    return order


def _embedding(reader: TrainedParams, enc: EncoderConfig, cut: Cut, dtype) -> np.ndarray:
    if enc.mel:
        u, v = reader.read(("embed_tokens", "U")), reader.read(("embed_tokens", "V"))
        return fold_mel(u, v, cut.rank, dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # _hf_tensors checks for inf
        return np.asarray(reader.read(("embed_tokens", "embedding")), dtype)


def _hf_tensors(reader: TrainedParams, enc: EncoderConfig, cut: Cut, dtype):
    """Yields (HF name, array in HF layout and `dtype`) in `_tensor_order`; ExportError for
    one holding NaN/inf."""
    cfg = enc.truncated(cut.layers)
    cast = f"after casting to {np.dtype(dtype).name}"
    leaf_path, leaf = None, None
    for name, rule, layer in _tensor_order(cut.layers):
        if rule.hf == "embed_tokens.weight":
            x = _embedding(reader, enc, cut, dtype)
            how = (f"after folding the MEL factors (U @ V) and casting to {np.dtype(dtype).name}"
                   if enc.mel else cast)
        else:
            if rule.ours != leaf_path:
                leaf = None  # release the previous leaf before restoring the next
                leaf, leaf_path = reader.read(rule.ours), rule.ours
            x = hf_names.to_hf(rule, leaf if layer is None else leaf[layer])
            with np.errstate(over="ignore", invalid="ignore"):  # checked below
                x = np.array(x, dtype, order="C")  # a copy: a view would pin the whole leaf
            how = cast
        _check_finite(name, x, reader, how)
        if x.shape != hf_names.hf_shape(rule, cfg):
            raise ExportError(f"internal: {name} came out {x.shape}, expected "
                              f"{hf_names.hf_shape(rule, cfg)}")
        yield name, x


def _plan_shards(order, cfg: EncoderConfig, itemsize: int, max_bytes: int) -> list[list[str]]:
    """Greedy split of the tensors (in writing order) into shards of at most max_bytes (a
    tensor larger than that gets a shard of its own)."""
    shards, size = [[]], 0
    for name, rule, _ in order:
        n = int(np.prod(hf_names.hf_shape(rule, cfg))) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_weights(out_dir, reader, enc, cut, dtype, max_shard_bytes) -> list[str]:
    """Writes model.safetensors (or shards + index); returns the file names."""
    order = _tensor_order(cut.layers)
    shards = _plan_shards(order, enc.truncated(cut.layers), np.dtype(dtype).itemsize,
                          max_shard_bytes)
    n = len(shards)
    files = (["model.safetensors"] if n == 1
             else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    tensors = _hf_tensors(reader, enc, cut, dtype)
    weight_map, total = {}, 0
    for names, fn in zip(shards, files):
        shard = dict(next(tensors) for _ in names)  # same order as planned
        assert list(shard) == names
        write_safetensors(os.path.join(out_dir, fn), shard, {"format": "pt"})
        total += sum(x.nbytes for x in shard.values())
        weight_map.update({name: fn for name in names})
        del shard
    if n > 1:
        storage.write_text_atomic(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
            os.path.join(out_dir, "model.safetensors.index.json"))
        files.append("model.safetensors.index.json")
    return files


def _write_factors(out_dir, reader, cut, dtype) -> None:
    """mel_factors.safetensors: the rank-R MEL factors, for the memory-saving embedding."""
    with np.errstate(over="ignore", invalid="ignore"):  # checked below
        u = np.asarray(reader.read(("embed_tokens", "U"))[:, :cut.rank], dtype, order="C")
        v = np.asarray(reader.read(("embed_tokens", "V"))[:cut.rank], dtype, order="C")
    for name, x in (("embed_tokens.U", u), ("embed_tokens.V", v)):
        _check_finite(name, x, reader, f"after casting to {np.dtype(dtype).name}")
    write_safetensors(os.path.join(out_dir, FACTORS_FILE),
                      {"embed_tokens.U": u, "embed_tokens.V": v},
                      {"format": "pt", "rank": cut.rank})


def _lora_note(reader, peft: bool) -> str:
    """The model card's paragraph on a LoRA checkpoint's export: merged, or the bare base."""
    rank, alpha, _ = reader.lora
    base = reader.integrity.lora_base
    if peft:
        return (f"**These are the weights of the base model `{base['path']}` (fingerprint "
                f"{base['fingerprint']}) without the LoRA adapters** (rank {rank}, alpha "
                f"{alpha:g}) this checkpoint trained: they are in `../{ADAPTER_DIR}`, which "
                "sentence-transformers and peft load together with this directory.\n\n")
    return (f"LoRA (rank {rank}, alpha {alpha:g}) trained on the base `{base['path']}` "
            f"(fingerprint {base['fingerprint']}); the adapters are merged into these weights "
            "(W + alpha / r A B).\n\n")


# ----------------------------------------------------------------------------- the export
def _check_out_dir(out_dir: str, overwrite: bool, reader_dirs: list[str]) -> None:
    storage.check_location(out_dir, "--output_dir")
    out = storage.normalized(storage.absolute(out_dir))
    for d in reader_dirs:  # --overwrite must never delete the training run
        run = storage.normalized(storage.absolute(d))
        if run == out or run.startswith(out.rstrip("/") + "/"):
            raise ExportError(f"--output_dir {out_dir!r} is or contains the training run {d!r}; "
                              "choose another directory")
    if not (storage.exists(out) or os.path.islink(out)):
        return
    if not overwrite:
        raise ExportError(f"--output_dir {out_dir!r} already exists; pass --overwrite to "
                          "replace it")
    if not storage.isdir(out):
        raise ExportError(f"--output_dir {out_dir!r} exists and is not a directory")
    entries = storage.listdir(out)
    if entries and not {"config.json", "modules.json"} & set(entries) \
            and not storage.isfile(os.path.join(out, ADAPTER_DIR, "adapter_config.json")):
        raise ExportError(f"--output_dir {out_dir!r} is a non-empty directory that does not look "
                          "like an export (no config.json or modules.json); refusing to "
                          "delete it, even with --overwrite")


def export_checkpoint(checkpoint: str, out_dir: str, *, rank: int | None = None,
                      layers: int | None = None, dim: int | None = None, mode: str = "compat",
                      tokenizer_dir: str | None = None, dtype: str = "bf16",
                      overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                      peft: bool = False) -> dict:
    """Exports `checkpoint` (a training workdir or one of its checkpoints/<step> dirs) to
    `out_dir` at size (rank R, layers K, dim M); None keeps the trained full size.
    A LoRA checkpoint exports merged (W + alpha / r A @ B), or with `peft` as the base's
    export in out_dir/base and a peft adapter directory in out_dir/adapter (peft_files.py).

    Returns a summary: {"step", "cut": Cut, "files": [...], "out_dir"}.
    """
    if mode not in MODES:
        raise ExportError(f"--mode {mode!r} must be one of {MODES}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} must be one of {tuple(DTYPES)}")
    try:
        reader = ToolParams(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(f"--model: {e}") from None
    config = reader.config
    enc = EncoderConfig.from_config(config.model)
    cut = choose_cut(enc, int(config.loss.mrl_min_dim), rank, layers, dim)
    if peft and reader.lora is None:
        raise ExportError("--peft needs a LoRA checkpoint (trained with model.lora.rank > 0); "
                          "this one trained the whole model: export it without --peft")
    if mode == "factorized" and not enc.mel:
        raise ExportError("--mode factorized needs a model trained with MEL (model.mel=True); "
                          "this one has a plain embedding table, use --mode compat")
    _check_out_dir(out_dir, overwrite, [reader.workdir])
    sources = training_sources(config, tokenizer_dir)

    out = storage.normalized(storage.absolute(out_dir))
    # Locally the export is built in a temporary directory renamed over `out` at the end. An
    # object store has no rename: there it is written in place (after removing the old export
    # --overwrite allowed), and a failed export removes what it wrote.
    remote = storage.is_url(out)
    tmp = out if remote else f"{out}.partial-{os.getpid()}"
    storage.rmtree(tmp)
    storage.makedirs(tmp)
    final_tmp = tmp  # where the model files go: the base's own directory with --peft
    if peft:
        reader.merge = False  # the base as trained on; the adapters go beside it
        tmp = os.path.join(final_tmp, BASE_DIR)
        storage.makedirs(tmp)
    try:
        np_dtype = DTYPES[dtype]
        files = _write_weights(tmp, reader, enc, cut, np_dtype, max_shard_bytes)
        if mode == "factorized":
            _write_factors(tmp, reader, cut, np_dtype)
            files.append(FACTORS_FILE)
        special = write_tokenizer(sources.tokenizer_dir, tmp, sources.eos_token_id,
                                  sources.max_seq_length, enc.vocab_size)
        check_same_ids(sources.tokenizer_dir, tmp, sources.max_seq_length)
        storage.write_text_atomic(json.dumps(hf_config(
            enc, cut.layers, dtype, special, _max_positions(config, sources.max_seq_length)),
            indent=2), os.path.join(tmp, "config.json"))
        prompts = prompts_from_manifest(sources.manifest)
        write_sentence_transformers_files(
            tmp, enc.hidden_size, sources.max_seq_length, prompts,
            truncate_dim=cut.dim if cut.dim != enc.hidden_size else None)
        card = render(
            config=config, step=reader.step, checkpoint=storage.absolute(checkpoint), cut=cut,
            enc=enc, mode=mode, dtype=dtype, manifest=sources.manifest, prompts=prompts,
            metrics=final_metrics(reader.workdir, reader.step),
            exits=model_exits(config.model.exits, config.model.num_layers),
            mrl_min_dim=int(config.loss.mrl_min_dim))
        if reader.lora is not None:
            card = card.replace("## Size (3D-ML choices)", _lora_note(reader, peft) +
                                "## Size (3D-ML choices)", 1)
        storage.write_text_atomic(card, os.path.join(tmp, "README.md"))
        if peft:
            files = [f"{BASE_DIR}/{f}" for f in files] + write_adapter_dir(
                final_tmp, reader, cut.layers, np_dtype, os.path.join(out, BASE_DIR))
            tmp = final_tmp
        if not remote:
            if os.path.lexists(out):
                shutil.rmtree(out)  # _check_out_dir allowed it (--overwrite, an old export)
            os.rename(tmp, out)
    except BaseException:
        storage.rmtree(final_tmp)
        raise
    return {"step": reader.step, "cut": cut, "files": files, "out_dir": out}
