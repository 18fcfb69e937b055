"""Embed texts with a trained model, at any point of the three Matryoshka dimensions.

    from mlembed_jax import encode
    model = encode.load("runs/demo")              # a training workdir, checkpoints/<step>,
                                                  # or a Hugging Face Qwen3 directory
    emb = model.encode(["hello", "bonjour"], rank=32, exit=2, dim=64)   # [2, 64] float32

Every result is L2-normalised float32, one row per input, in input order.

The three knobs (each defaults to the full model):
  rank  MEL rank of the token embedding (training checkpoints with MEL only).
  exit  MLL exit: the model cut to its first `exit` layers; only those layers are run.
  dim   MRL dim: the first `dim` dimensions of the pooled embedding, re-normalised.
By default each must be a point the model was trained at: rank in the MEL rank set
{r_min, 2 r_min, ..., r_max}, exit in the model's MLL exits, dim in the MRL dims
{d, min_dim * 2^k < d}. `allow_untrained=True` (CLI: --allow_untrained) widens them to
rank in [1, r_max], exit in [1, L], dim in [1, d]: those still run (all three dimensions are
prefixes of one model) but the loss never looked at them, so quality there is unmeasured.

Speed: texts are tokenised exactly as in training (text_encoding.encode_texts: no special
tokens, truncated to max_seq_length - 1, EOS appended), sorted by length, longest first, and
packed first-fit into [rows, seq] batches with segment ids (several short texts per row).
seq is the power of two above the batch's longest text and rows = batch_tokens // seq, so
a run compiles a handful of shapes, not one per batch. Results are scattered back to input
order, so neither the batch size nor the sorting can change which row belongs to which input.

CLI (one text per line, or JSONL with a text field; writes .npy or .parquet):
    python -m mlembed_jax.encode --model=runs/demo --input=texts.jsonl --output=emb.parquet \
        [--field=text] [--id_field=_id] [--rank=32] [--exit=2] [--dim=64] [--prefix="query: "]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from mlembed_jax.jsonl import iter_jsonl

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BATCH_TOKENS = 16384
_MIN_SEQ = 16  # smallest packed row length: fewer shapes for very short texts
_MIN_TEXTS = 8  # smallest number of pooling slots per batch


class EncodeError(ValueError):
    """A request the model cannot serve (bad rank/exit/dim, bad input file, missing
    tokenizer); the message says what was asked, what is allowed and how to fix it."""


# --------------------------------------------------------------------------- packing

def _pow2_at_least(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Where the texts of one inference batch go.

    index   [m] int64: input positions of the batch's texts; text slot j holds input index[j]
    rows    [m] int: row of each text;  offsets [m] int: its first column in that row
    num_rows, seq_len: the batch's token arrays are [num_rows, seq_len]
    num_slots: pool_index is [1, num_slots] (>= m; the extra slots point at token 0 and their
      outputs are dropped)
    """

    index: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    num_rows: int
    seq_len: int
    num_slots: int


def plan_batches(lengths: Sequence[int], batch_tokens: int = DEFAULT_BATCH_TOKENS
                 ) -> list[BatchPlan]:
    """Length-sorted first-fit-decreasing packing of texts into inference batches.

    lengths: [n] token counts (EOS included, each >= 1). Texts are visited longest first; a
    batch's row length is the power of two >= its first (longest) text, it has at most
    batch_tokens // seq_len rows, and each text goes into the first row with room (a new row
    if none has room; the batch closes when it would need more rows). Because the visit order
    is descending, this online loop is exactly first-fit-decreasing on each batch's texts.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.min() < 1:
        raise EncodeError("every text needs at least one token (its EOS)")
    order = np.argsort(-lengths, kind="stable")  # ties keep input order: deterministic
    plans, i, n = [], 0, len(order)
    while i < n:
        seq = _pow2_at_least(lengths[order[i]], _MIN_SEQ)
        max_rows = max(1, batch_tokens // seq)
        free = np.full(max_rows, seq, np.int64)
        used = 0
        members, rows, offsets = [], [], []
        while i < n:
            length = lengths[order[i]]
            r = -1
            if used:
                fits = free[:used] >= length
                first = int(np.argmax(fits))
                if fits[first]:
                    r = first
            if r < 0:
                if used == max_rows:
                    break
                r, used = used, used + 1
            members.append(order[i])
            rows.append(r)
            offsets.append(seq - free[r])
            free[r] -= length
            i += 1
        plans.append(BatchPlan(
            index=np.asarray(members, np.int64), rows=np.asarray(rows, np.int64),
            offsets=np.asarray(offsets, np.int64),
            # Round rows and slots up to powers of two so the last, partly filled batches
            # of each row length reuse a few compiled shapes.
            num_rows=min(_pow2_at_least(used), max_rows), seq_len=seq,
            num_slots=_pow2_at_least(len(members), _MIN_TEXTS)))
    return plans


def build_batch(plan: BatchPlan, ids: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The packed arrays of one plan (layout as mlembed_jax/batch.py, one pack).

    Returns tokens, segment_ids, positions [num_rows, seq_len] int32 and pool_index
    [1, num_slots] int32 (flat row * seq_len + col of each text's last token).
    """
    R, S = plan.num_rows, plan.seq_len
    tokens = np.zeros((R, S), np.int32)
    segment_ids = np.zeros((R, S), np.int32)
    positions = np.zeros((R, S), np.int32)
    pool_index = np.zeros((1, plan.num_slots), np.int32)
    next_segment = np.ones(R, np.int32)
    # Texts were placed left to right within each row, so segment ids follow column order.
    for slot, (j, r, o) in enumerate(zip(plan.index, plan.rows, plan.offsets)):
        t = ids[j]
        n = len(t)
        tokens[r, o:o + n] = t
        segment_ids[r, o:o + n] = next_segment[r]
        positions[r, o:o + n] = np.arange(n, dtype=np.int32)
        next_segment[r] += 1
        pool_index[0, slot] = r * S + o + n - 1
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "pool_index": pool_index}


# --------------------------------------------------------------------------- forward

@functools.partial(jax.jit, static_argnames=("run_cfg",))
def _forward(params, tokens, segment_ids, positions, pool_index, rank, run_cfg):
    """[len(run_cfg.exits), slots, d] float32 pooled (not yet normalised) embeddings.

    run_cfg has num_layers = the deepest exit wanted, so layers past it are never run;
    params may hold more layers and are cut here.
    """
    from mlembed_jax.model.encoder import encode, truncate_params

    stacked = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    if stacked != run_cfg.num_layers:
        params = truncate_params(params, run_cfg.num_layers)
    out = encode(params, run_cfg, tokens, segment_ids, positions, pool_index, rank=rank)
    return out["pooled"]


def embed_token_ids(params, cfg, ids: Sequence[np.ndarray], exits: Sequence[int], *,
                    rank: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                    progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Low-level: pooled embeddings of pre-tokenised texts at several exits, no checks.

    params: encoder params (host or device arrays, any sharding); cfg: its EncoderConfig.
    ids: n int arrays, EOS last. exits: layers to pool after (each in [1, cfg.num_layers]);
    only max(exits) layers run. rank: MEL rank (None = r_max / plain embedding).
    Returns [len(exits), n, d] float32, NOT normalised (see `normalize`), in input order.
    """
    from tqdm import tqdm

    exits = tuple(int(e) for e in exits)
    depth = max(exits)
    run_cfg = dataclasses.replace(cfg.truncated(depth), exits=exits, remat="none")
    rank_arg = None if (rank is None or not cfg.mel) else np.int32(rank)
    lengths = [len(t) for t in ids]
    out = np.zeros((len(exits), len(ids), cfg.hidden_size), np.float32)
    plans = plan_batches(lengths, batch_tokens)

    def collect(plan, pooled):
        out[:, plan.index] = np.asarray(pooled)[:, :len(plan.index)]
        bar.update(len(plan.index))

    # Empty logical-axis rules: the model's activation constraints become no-ops, so this
    # runs the same inside the training loop's sharding context (on sharded params) as
    # outside it; XLA lays the activations out from the params' shardings.
    with nn.logical_axis_rules(()), tqdm(total=len(ids), desc=desc, unit="text",
                                         disable=not progress, dynamic_ncols=True) as bar:
        pending = None
        for plan in plans:
            arrays = build_batch(plan, ids)
            pooled = _forward(params, arrays["tokens"], arrays["segment_ids"],
                              arrays["positions"], arrays["pool_index"], rank_arg, run_cfg)
            # Fetch the previous batch only after dispatching this one, so packing the next
            # batch on the host overlaps the device's work.
            if pending is not None:
                collect(*pending)
            pending = (plan, pooled)
        if pending is not None:
            collect(*pending)
    return out


def normalize(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """[..., d] -> [..., dim] float32: the first `dim` dims, L2-normalised (MRL truncation)."""
    x = np.asarray(x, np.float32)
    if dim is not None:
        x = x[..., :dim]
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------- the model

@dataclasses.dataclass
class Encoder:
    """A model ready to embed text. Build it with `load`, or directly from params.

    params: encoder params pytree (numpy or jax arrays). cfg: its EncoderConfig.
    tokenizer: HF tokenizer (None: only `encode_ids` works). max_seq_length: truncation
    length, EOS included (as in training). mrl_min_dim: the smallest MRL dim trained.
    prefixes: dataset name -> {"query": ..., "document": ...} instruction prefixes known
    from the training manifest (or an exported model's prompts), for callers to pick from.
    """

    params: Any
    cfg: Any
    tokenizer: Any = None
    max_seq_length: int = 1024
    mrl_min_dim: int = 8
    prefixes: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    step: int | None = None
    train_config: Any = None  # the saved run config of a training checkpoint
    default_dim: int | None = None  # dim when none is asked for (an export's truncate_dim)

    # -- the trained points of the three dimensions
    @property
    def ranks(self) -> tuple[int, ...]:
        """MEL ranks trained (() for a plain token embedding)."""
        from mlembed_jax.model.factorized_embed import mel_rank_set

        return mel_rank_set(self.cfg.mel_r_min, self.cfg.mel_r_max) if self.cfg.mel else ()

    @property
    def exits(self) -> tuple[int, ...]:
        return tuple(self.cfg.exits)

    @property
    def dims(self) -> tuple[int, ...]:
        """MRL dims trained, largest first."""
        from mlembed_jax.loss import mrl_dims

        return mrl_dims(self.cfg.hidden_size, self.mrl_min_dim)

    def check(self, rank=None, exit=None, dim=None, allow_untrained: bool = False):
        """Resolves None to the full model and checks the point -> (rank|None, exit, dim)."""
        c = self.cfg
        if rank is not None:
            if not c.mel:
                raise EncodeError(
                    f"rank={rank} was given, but {self.source or 'this model'} has a plain "
                    "token embedding (no MEL factors), so it has no rank to choose; leave "
                    "rank unset (an exported compatibility-mode model already has its rank "
                    "folded in)")
            rank = _check_point("rank", rank, self.ranks, c.mel_r_max, "r_max=",
                                allow_untrained, "a trained MEL rank", "use any rank")
        elif c.mel:
            rank = c.mel_r_max
        exit = _check_point("exit", c.num_layers if exit is None else exit, self.exits,
                            c.num_layers, "", allow_untrained,
                            "one of the model's MLL exits", "cut the model after any layer")
        if dim is None:
            dim = self.default_dim or c.hidden_size
        dim = _check_point("dim", dim, self.dims, c.hidden_size, "d=", allow_untrained,
                           "one of the trained MRL dims", "take any dim")
        return rank, exit, dim

    # -- tokenisation
    def tokenize(self, texts: Sequence[str], prefix: str = "") -> list[np.ndarray]:
        """Texts -> token ids exactly as training made them (prefix + text, EOS last)."""
        from mlembed_jax.data.text_encoding import encode_texts

        if self.tokenizer is None:
            raise EncodeError("this Encoder has no tokenizer; pass tokenizer_dir to load(), "
                              "or use encode_ids with pre-tokenised texts")
        if isinstance(texts, str):
            raise EncodeError("texts must be a list of strings, not one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise EncodeError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a "
                              "string")
        if not texts:
            return []
        return encode_texts(self.tokenizer, [prefix + t for t in texts], self.max_seq_length)

    # -- embedding
    def encode(self, texts: Sequence[str], *, rank=None, exit=None, dim=None, prefix: str = "",
               batch_tokens: int = DEFAULT_BATCH_TOKENS, allow_untrained: bool = False,
               progress: bool = False) -> np.ndarray:
        """texts (n strings) -> [n, dim] float32, L2-normalised, in input order."""
        rank, exit, dim = self.check(rank, exit, dim, allow_untrained)  # fail before tokenising
        return self.encode_ids(self.tokenize(texts, prefix), rank=rank, exit=exit, dim=dim,
                               batch_tokens=batch_tokens, allow_untrained=allow_untrained,
                               progress=progress)

    def encode_ids(self, ids: Sequence[Sequence[int]], *, rank=None, exit=None, dim=None,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, allow_untrained: bool = False,
                   progress: bool = False) -> np.ndarray:
        """Pre-tokenised texts (n int sequences, EOS last, as prepared data holds them)
        -> [n, dim] float32, L2-normalised, in input order."""
        rank, exit, dim = self.check(rank, exit, dim, allow_untrained)
        pooled = self._pooled(ids, rank, (exit,), batch_tokens, progress)
        return normalize(pooled[0], dim)

    def encode_exits(self, ids: Sequence[Sequence[int]], exits: Sequence[int], *, rank=None,
                     batch_tokens: int = DEFAULT_BATCH_TOKENS, allow_untrained: bool = False,
                     progress: bool = False) -> dict[int, np.ndarray]:
        """Several exits from one pass of max(exits) layers (for grids such as the
        Matryoshka report). Returns exit -> [n, d] float32, L2-normalised at full d; take
        smaller dims with `normalize(x, dim)`."""
        checked = [self.check(rank, e, None, allow_untrained) for e in exits]
        rank = checked[0][0]
        wanted = sorted({e for _, e, _ in checked})
        pooled = self._pooled(ids, rank, tuple(wanted), batch_tokens, progress)
        return {e: normalize(pooled[i]) for i, e in enumerate(wanted)}

    def _pooled(self, ids, rank, exits, batch_tokens, progress):
        if batch_tokens < 1:
            raise EncodeError(f"batch_tokens={batch_tokens} must be positive")
        arrays = []
        for i, t in enumerate(ids):
            a = np.asarray(t, np.int32)
            if a.ndim != 1 or len(a) < 1:
                raise EncodeError(f"ids[{i}] must be a non-empty 1-D sequence of token ids")
            if a.min() < 0 or a.max() >= self.cfg.vocab_size:
                raise EncodeError(f"ids[{i}] has token ids outside [0, vocab_size="
                                  f"{self.cfg.vocab_size})")
            arrays.append(a)
        if not arrays:
            return np.zeros((len(exits), 0, self.cfg.hidden_size), np.float32)
        return embed_token_ids(self.params, self.cfg, arrays, exits, rank=rank,
                               batch_tokens=batch_tokens, progress=progress)


def _check_point(name: str, value, trained, top: int, top_name: str, allow_untrained: bool,
                 what: str, instead: str) -> int:
    """`value` as an int that is in `trained`, or with allow_untrained anywhere in [1, top]."""
    value = _as_int(name, value)
    if allow_untrained:
        if not 1 <= value <= top:
            raise EncodeError(f"{name}={value} is outside [1, {top_name}{top}]")
    elif value not in trained:
        raise EncodeError(f"{name}={value} is not {what} {tuple(sorted(trained))}; pass "
                          f"allow_untrained=True (--allow_untrained) to {instead} in "
                          f"[1, {top}]")
    return value


def _as_int(name: str, value) -> int:
    try:
        ok = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise EncodeError(f"{name}={value!r} must be an integer")
    return int(value)


# --------------------------------------------------------------------------- loading

def _resolve_tokenizer_dir(recorded: str, prepared_dir: str) -> str | None:
    """prepared.json records the tokenizer path as prepare_data was given it (often relative
    to where it ran); try it as is, then beside the prepared data, then under the repo."""
    if os.path.isabs(recorded):
        return recorded if os.path.isdir(recorded) else None
    for base in (os.getcwd(), prepared_dir, os.path.dirname(prepared_dir), _REPO_ROOT):
        candidate = os.path.join(base, recorded)
        if os.path.isdir(candidate):
            return candidate
    return None


def _training_tokenizer(config, tokenizer_dir: str | None, path: str):
    """(tokenizer_dir, max_seq_length, prefixes) for a training checkpoint's config."""
    prepared_dir = str(config.data.prepared_dir) if "data" in config else ""
    info = {}
    info_path = os.path.join(prepared_dir, "prepared.json") if prepared_dir else ""
    if info_path and os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    prefixes = {name: {"query": spec.get("query_prefix", ""),
                       "document": spec.get("document_prefix", "")}
                for name, spec in info.get("manifest", {}).items()}
    max_len = int(info.get("max_seq_length", config.data.max_seq_length if "data" in config
                           else 1024))
    if tokenizer_dir is None:
        recorded = info.get("tokenizer_dir")
        tokenizer_dir = _resolve_tokenizer_dir(recorded, prepared_dir) if recorded else None
        if tokenizer_dir is None:
            raise EncodeError(
                f"cannot find the tokenizer of checkpoint {path!r}: its config names prepared "
                f"data {prepared_dir!r}, whose prepared.json "
                + (f"records tokenizer_dir {recorded!r}, which does not exist"
                   if recorded else "is missing")
                + "; pass tokenizer_dir= (CLI: --tokenizer_dir) pointing at the tokenizer "
                "the data was prepared with")
    return tokenizer_dir, max_len, prefixes


def load(path: str, *, tokenizer_dir: str | None = None, max_seq_length: int | None = None,
         compute_dtype: str | None = None, attention: str | None = None,
         device_put: bool = True) -> Encoder:
    """An Encoder from a training workdir, WORKDIR/checkpoints/<step>, or an HF Qwen3 dir.

    Training checkpoints bring their MEL factors (rank selectable), exits and MRL dims from
    the saved config, and the tokenizer and max_seq_length of the prepared data they were
    trained on. HF directories (plain, or exported by tools/export_hf) use their own
    tokenizer, the recipe's exits for their depth and MRL dims down to 8; a
    sentence-transformers export also brings its max_seq_length, prompts (as `prefixes`)
    and truncate_dim (the default dim).
    tokenizer_dir / max_seq_length override what the checkpoint says; compute_dtype
    ("float32" | "bfloat16") and attention override the model's compute settings.
    """
    from mlembed_jax.data.text_encoding import TokenizerError, load_tokenizer
    from mlembed_jax.model.qwen3 import EncoderConfig

    config, default_dim = None, None
    if not os.path.exists(path):
        raise EncodeError(f"model path {path!r} does not exist; give a training workdir, a "
                          "checkpoints/<step> directory, or a Hugging Face model directory")
    overrides = {k: v for k, v in (("compute_dtype", compute_dtype),
                                   ("attention", attention)) if v is not None}
    if os.path.isfile(os.path.join(path, "config.json")):
        from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params

        cfg = encoder_config_from_hf(path, mel=False, exits=(), **overrides)
        params = load_hf_params(path, cfg)
        tok_dir = tokenizer_dir or path
        max_len, prefixes, default_dim = _hf_sentence_settings(path)
        mrl_min, step = 8, None
    else:
        from mlembed_jax.checkpoint import load_trained

        config, params, step = load_trained(path)
        cfg = dataclasses.replace(EncoderConfig.from_config(config.model), **overrides)
        tok_dir, max_len, prefixes = _training_tokenizer(config, tokenizer_dir, path)
        mrl_min = int(config.loss.mrl_min_dim) if "loss" in config else 8
    cfg = _runnable_attention(cfg, attention is not None, path)
    try:
        tokenizer = load_tokenizer(tok_dir)
    except TokenizerError as e:
        raise EncodeError(f"{e}; pass tokenizer_dir= (CLI: --tokenizer_dir)") from e
    if max_seq_length is not None:
        max_len = int(max_seq_length)
    if max_len < 2:
        raise EncodeError(f"max_seq_length={max_len} must be at least 2 (text + EOS)")
    if device_put:
        params = jax.device_put(params)  # once, not on every batch
    return Encoder(params=params, cfg=cfg, tokenizer=tokenizer, max_seq_length=max_len,
                   mrl_min_dim=mrl_min, prefixes=prefixes, source=path, step=step,
                   train_config=config, default_dim=default_dim)


def _runnable_attention(cfg, chosen: bool, path: str):
    """cfg, with the portable `dense` kernel if the saved one cannot run on this platform.

    A model trained with a GPU kernel still encodes on a CPU: every kernel computes the same
    function (tests/test_attention_kernels.py), so only speed changes, and a note says so.
    A kernel the caller chose explicitly is never replaced: that is an error instead.
    """
    from mlembed_jax.model.attention import check_platform

    platform = jax.devices()[0].platform
    try:
        check_platform(cfg.attention, platform)
        return cfg
    except (ValueError, ImportError) as e:
        if chosen:
            raise EncodeError(str(e)) from None
    print(f"note: {path} was trained with attention={cfg.attention!r}, which cannot run on "
          f"this {platform}; encoding with 'dense' instead (same embeddings; pass "
          "attention= / --attention to choose)", file=sys.stderr)
    return dataclasses.replace(cfg, attention="dense")


def _hf_sentence_settings(path: str) -> tuple[int, dict, int | None]:
    """max_seq_length, prompts and truncate_dim of a sentence-transformers export, if any.

    Prompts named "query" / "document" (or "passage") become the "default" prefixes;
    "<dataset>_query" / "<dataset>_document" (tools/export_hf's names) that dataset's.
    """
    max_len, prefixes, truncate_dim = 1024, {}, None
    st = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(st):
        with open(st) as f:
            max_len = int(json.load(f).get("max_seq_length") or max_len)
    st = os.path.join(path, "config_sentence_transformers.json")
    if os.path.isfile(st):
        with open(st) as f:
            meta = json.load(f)
        truncate_dim = meta.get("truncate_dim")
        for name, text in (meta.get("prompts") or {}).items():
            for role, words in (("query", ("query",)), ("document", ("document", "passage"))):
                for w in words:
                    if name == w or name.endswith("_" + w):
                        key = "default" if name == w else name[:-len(w) - 1]
                        prefixes.setdefault(key, {"query": "", "document": ""})[role] = text
    return max_len, prefixes, truncate_dim


# --------------------------------------------------------------------------- CLI

def read_texts(path: str, field: str = "text", id_field: str | None = None
               ) -> tuple[list[str], list | None]:
    """Texts (and ids) from a file: .jsonl -> one JSON object (or string) per line, text in
    `field`; anything else -> one text per line. Errors name the file and the line."""
    if not os.path.isfile(path):
        raise EncodeError(f"input file {path!r} does not exist")
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            texts = f.read().splitlines()
        return texts, ([str(i) for i in range(len(texts))] if id_field else None)
    texts, ids = [], [] if id_field else None
    for lineno, obj in iter_jsonl(path, EncodeError):
        if isinstance(obj, str):
            text, ident = obj, str(len(texts))
        elif isinstance(obj, dict):
            if field not in obj or not isinstance(obj[field], str):
                raise EncodeError(f"{path}:{lineno}: no string field {field!r} (fields: "
                                  f"{sorted(obj)}); choose one with --field")
            text = obj[field]
            ident = obj.get(id_field, str(len(texts))) if id_field else None
        else:
            raise EncodeError(f"{path}:{lineno}: expected a JSON object or string, got "
                              f"{type(obj).__name__}")
        texts.append(text)
        if ids is not None:
            ids.append(ident)
    return texts, ids


def write_embeddings(path: str, emb: np.ndarray, ids: list | None = None) -> None:
    """[n, dim] float32 -> .npy (the array) or .parquet (columns id, embedding)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npy"):
        np.save(path, emb)
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        n, d = emb.shape
        flat = pa.array(emb.reshape(-1), pa.float32())
        col = pa.FixedSizeListArray.from_arrays(flat, d)
        ids = [str(i) for i in (ids if ids is not None else range(n))]
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "embedding": col}), path)
    else:
        raise EncodeError(f"output {path!r} must end in .npy or .parquet")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mlembed_jax.encode",
                                description="Embed a text or JSONL file with a trained model.")
    p.add_argument("--model", required=True, help="training workdir, checkpoints/<step>, or "
                   "HF Qwen3 directory")
    p.add_argument("--input", required=True, help=".jsonl (one object per line) or a text "
                   "file (one text per line)")
    p.add_argument("--output", required=True, help=".npy or .parquet")
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--id_field", default="_id", help="JSONL field copied to the parquet id "
                   "column (the line's index if absent)")
    p.add_argument("--rank", type=int, default=None, help="MEL rank (default r_max)")
    p.add_argument("--exit", type=int, default=None, help="MLL exit layer (default: last)")
    p.add_argument("--dim", type=int, default=None, help="MRL output dim (default: d)")
    p.add_argument("--prefix", default="", help="instruction prefix put before every text")
    p.add_argument("--allow_untrained", action="store_true",
                   help="allow rank/exit/dim values the model was not trained at")
    p.add_argument("--batch_tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    p.add_argument("--tokenizer_dir", default=None)
    p.add_argument("--max_seq_length", type=int, default=None)
    p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default=None)
    a = p.parse_args(argv)
    try:
        texts, ids = read_texts(a.input, a.field, a.id_field)
        model = load(a.model, tokenizer_dir=a.tokenizer_dir, max_seq_length=a.max_seq_length,
                     compute_dtype=a.compute_dtype)
        emb = model.encode(texts, rank=a.rank, exit=a.exit, dim=a.dim, prefix=a.prefix,
                           batch_tokens=a.batch_tokens, allow_untrained=a.allow_untrained,
                           progress=True)
        write_embeddings(a.output, emb, ids)
    except (ValueError, FileNotFoundError) as e:  # EncodeError, CheckpointError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
