"""Embed texts with a trained model, at any point of the three Matryoshka dimensions.

    from mlembed_jax import encode
    model = encode.load("runs/demo")              # a training workdir, checkpoints/<step>,
                                                  # or a Hugging Face Qwen3 directory
    emb = model.encode(["hello", "bonjour"], rank=32, exit=2, dim=64)   # [2, 64] float32

Every result is L2-normalised float32, one row per input, in input order, and finite: NaN
or inf embeddings (a diverged checkpoint) raise NonFiniteEmbeddings, naming the checkpoint
and the other checkpoints of its run that embed the first failing text finitely.

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
tokens, truncated to max_seq_length - 1, EOS appended), then packed several to a row and run
by embedding.embed_token_ids (data/packing.py `plan_batches` says how), one pack per local
device at a time. Results come back in input order, so neither the batch size, the sorting
nor the device count can change which row belongs to which input.

CLI (one text per line, or JSONL with a text field; writes .npy or .parquet, checked before
anything is read; empty texts get a warning and truncated texts a note, each with FILE:LINE):
    python -m mlembed_jax.encode --model=runs/demo --input=texts.jsonl --output=emb.parquet \
        [--field=text] [--id_field=_id] [--rank=32] [--exit=2] [--dim=64] [--prefix="query: "]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlembed_jax import storage
from mlembed_jax.checkpoint import reader as checkpoint
from mlembed_jax.cli import missing_dirs, remove_empty, writable_file
from mlembed_jax.data.jsonl import iter_jsonl
from mlembed_jax.data.prepared import training_text
from mlembed_jax.data.text_encoding import (
    TokenizerError,
    encode_texts,
    load_tokenizer,
    max_seq_length_problem,
)
from mlembed_jax.embedding import (
    DEFAULT_BATCH_TOKENS,
    embed_token_ids,
    local_mesh,
    normalize,
    params_mesh,
    replicate,
)
from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params
from mlembed_jax.model.kernel_check import choose_for_devices
from mlembed_jax.model.kernel_choice import AUTO, SPLASH_LANES, check_platform
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.recipe import MRL_MIN_DIM, TrainedPoints, resolve_point

__all__ = ["DEFAULT_BATCH_TOKENS", "EncodeError", "EncodeSettings", "Encoder", "ModelSettings",
           "NonFiniteEmbeddings", "load", "normalize", "main"]


class EncodeError(ValueError):
    """A request the model cannot serve (bad rank/exit/dim, bad input file, missing
    tokenizer); the message says what was asked, what is allowed and how to fix it."""


class NonFiniteEmbeddings(EncodeError):
    """The model gave NaN/inf embeddings (diverged or overflowing weights); the message names
    the checkpoint and the other checkpoints that embed the first failing text finitely.
    `first`: that text's index in the input."""

    def __init__(self, message: str, first: int):
        super().__init__(message)
        self.first = first


# --------------------------------------------------------------------------- the model

@dataclasses.dataclass
class Encoder:
    """A model ready to embed text. Build it with `load`, or directly from params.

    params: encoder params pytree (numpy or jax arrays). cfg: its EncoderConfig.
    mesh: where to encode, one pack per device of its batch axes (default: the params' own
    mesh if they are laid out on one, else every local device, params replicated once).
    tokenizer: HF tokenizer (None: only `encode_ids` works). max_seq_length: truncation
    length, EOS included (as in training). mrl_min_dim: the smallest MRL dim trained.
    prefixes: dataset name -> {"query": ..., "document": ...} instruction prefixes known
    from the training manifest (or an exported model's prompts), for callers to pick from.
    """

    params: Any
    cfg: Any
    tokenizer: Any = None
    max_seq_length: int = 1024
    mrl_min_dim: int = MRL_MIN_DIM
    prefixes: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    step: int | None = None
    train_config: Any = None  # the saved run config of a training checkpoint
    default_dim: int | None = None  # dim when none is asked for (an export's truncate_dim)
    mesh: Any = None

    # -- the trained points of the three dimensions
    @property
    def points(self) -> TrainedPoints:
        return TrainedPoints.of(self.cfg, self.mrl_min_dim)

    @property
    def ranks(self) -> tuple[int, ...]:
        """MEL ranks trained (() for a plain token embedding)."""
        return self.points.ranks

    @property
    def exits(self) -> tuple[int, ...]:
        return self.points.exits

    @property
    def dims(self) -> tuple[int, ...]:
        """MRL dims trained, largest first."""
        return self.points.dims

    def check(self, rank=None, exit=None, dim=None, allow_untrained: bool = False):
        """Resolves None to the full model and checks the point -> (rank|None, exit, dim).
        A point off the trained sets is an error unless allow_untrained."""
        check = resolve_point(self.points, rank, exit, dim, default_dim=self.default_dim)
        problems = check.problems(allow_untrained)
        if problems:
            hint = ""
            if "rank" in check.impossible and not self.cfg.mel:
                hint = (" (an exported compatibility-mode model already has its rank folded "
                        "in; leave rank unset)")
            elif not allow_untrained and check.untrained:
                hint = ("; pass allow_untrained=True (--allow_untrained) to use any point the "
                        "weights hold")
            raise EncodeError(f"{self.source or 'this model'}: " + "; ".join(problems) + hint)
        p = check.point
        return p.rank, p.exit, p.dim

    # -- tokenisation
    def tokenize(self, texts: Sequence[str], prefix: str = "") -> list[np.ndarray]:
        """Texts -> token ids exactly as training made them (prefix + text, EOS last)."""
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
               progress: bool = False, desc: str = "encode") -> np.ndarray:
        """texts (n strings) -> [n, dim] float32, L2-normalised, in input order.
        progress: a progress bar (labelled desc) with texts/s."""
        rank, exit, dim = self.check(rank, exit, dim, allow_untrained)  # fail before tokenising
        return self.encode_ids(self.tokenize(texts, prefix), rank=rank, exit=exit, dim=dim,
                               batch_tokens=batch_tokens, allow_untrained=allow_untrained,
                               progress=progress, desc=desc)

    def encode_ids(self, ids: Sequence[Sequence[int]], *, rank=None, exit=None, dim=None,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, allow_untrained: bool = False,
                   progress: bool = False, desc: str = "encode") -> np.ndarray:
        """Pre-tokenised texts (n int sequences, EOS last, as prepared data holds them)
        -> [n, dim] float32, L2-normalised, in input order."""
        rank, exit, dim = self.check(rank, exit, dim, allow_untrained)
        pooled = self._pooled(ids, rank, (exit,), batch_tokens, progress, desc)
        with np.errstate(over="ignore", invalid="ignore"):  # _finite reports it instead
            return self._finite(normalize(pooled[0], dim), ids, rank, exit)

    def encode_exits(self, ids: Sequence[Sequence[int]], exits: Sequence[int], *, rank=None,
                     batch_tokens: int = DEFAULT_BATCH_TOKENS, allow_untrained: bool = False,
                     progress: bool = False) -> dict[int, np.ndarray]:
        """Several exits from one pass of max(exits) layers (for grids such as the
        Matryoshka report). Returns exit -> [n, d] float32, L2-normalised at full d; take
        smaller dims with `normalize(x, dim)`."""
        checked = [self.check(rank, e, None, allow_untrained) for e in exits]
        rank = checked[0][0]
        wanted = sorted({e for _, e, _ in checked})
        pooled = self._pooled(ids, rank, tuple(wanted), batch_tokens, progress, "encode")
        with np.errstate(over="ignore", invalid="ignore"):  # _finite reports it instead
            return {e: self._finite(normalize(pooled[i]), ids, rank, e)
                    for i, e in enumerate(wanted)}

    def _finite(self, emb: np.ndarray, ids, rank, exit) -> np.ndarray:
        """emb, or NonFiniteEmbeddings when a row holds NaN/inf: a diverged checkpoint must
        not pass for a model. (A finite row that overflows its norm comes out as zeros,
        which normalize cannot tell from a zero vector; that is caught too.)"""
        bad = ~np.isfinite(emb).all(axis=-1) | ~np.any(emb != 0, axis=-1)
        if not bad.any():
            return emb
        first = int(np.flatnonzero(bad)[0])
        raise NonFiniteEmbeddings(self._nonfinite_message(int(bad.sum()), len(emb), first,
                                                          ids[first], rank, exit), first)

    def _nonfinite_message(self, n_bad: int, n: int, first: int, first_ids, rank, exit
                           ) -> str:
        import jax.numpy as jnp

        largest = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(
            self.params))
        what = (f"gives NaN/inf (or overflowing) embeddings for {n_bad} of {n} texts (first: "
                f"text {first}; its largest |weight| is {largest:.3g})")
        if self.train_config is None:  # an HF directory: no other checkpoints to offer
            return f"model {self.source} {what}; use another model"
        ckpt_dir, step = checkpoint.resolve_checkpoint(self.source)
        good, tried = self._finite_elsewhere(ckpt_dir, step, first_ids, rank, exit)
        hint = (f"no other checkpoint in {ckpt_dir} embeds that text finitely ({tried} "
                "checked)" if not good else
                "other checkpoints that embed that text finitely: "
                + ", ".join(os.path.join(ckpt_dir, str(s)) for s in good)
                + "; pass one of them as --model")
        return f"checkpoint {os.path.join(ckpt_dir, str(step))} (step {step}) {what}; {hint}"

    def _finite_elsewhere(self, ckpt_dir: str, step: int, ids, rank, exit,
                          want: int = 2, limit: int = 6) -> tuple[list[int], int]:
        """(steps, how many were tried): the other checkpoints of the run, nearest first,
        whose params are intact and embed `ids` finitely. Each costs a restore and one
        forward pass, hence `want` and `limit`; error messages only."""
        others = sorted((s for s in checkpoint.finished_steps(ckpt_dir) if s != step),
                        key=lambda s: (abs(s - step), s > step))[:limit]
        good = []
        for s in others:
            try:
                params = checkpoint.ToolParams(os.path.join(ckpt_dir, str(s)), quiet=True,
                                               name_intact=False).read_all()
            except (checkpoint.CheckpointError, FileNotFoundError, KeyError):
                continue
            probe = Encoder(params=params, cfg=self.cfg, mesh=self.mesh)
            with np.errstate(over="ignore", invalid="ignore"):
                emb = normalize(probe._pooled([ids], rank, (exit,), DEFAULT_BATCH_TOKENS,
                                              False, "check")[0])
            if np.isfinite(emb).all() and np.any(emb != 0):
                good.append(s)
                if len(good) >= want:
                    break
        return good, len(others)

    def _pooled(self, ids, rank, exits, batch_tokens, progress, desc):
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
        if params_mesh(self.params) is None:  # place once, not on every call
            self.params = replicate(self.params, self.mesh or local_mesh())
        return embed_token_ids(self.params, self.cfg, arrays, exits, rank=rank,
                               batch_tokens=batch_tokens, progress=progress, desc=desc,
                               mesh=self.mesh)


# --------------------------------------------------------------------------- loading

def _training_tokenizer(config, tokenizer_dir: str | None, path: str):
    """(tokenizer_dir, max_seq_length, prefixes) for a training checkpoint's config."""
    text = training_text(config)
    if tokenizer_dir is None:
        tokenizer_dir = text.tokenizer_dir
        if tokenizer_dir is None:
            raise EncodeError(f"checkpoint {path!r}: " + text.tokenizer_not_found(
                "pass tokenizer_dir= (CLI: --tokenizer_dir) pointing at it"))
    return tokenizer_dir, text.max_seq_length, text.prefixes()


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
    config, default_dim = None, None
    storage.check_location(path, "model")
    if not storage.exists(path):
        raise EncodeError(f"model path {path!r} does not exist; give a training workdir, a "
                          "checkpoints/<step> directory, or a Hugging Face model directory")
    overrides = {k: v for k, v in (("compute_dtype", compute_dtype),
                                   ("attention", attention)) if v is not None}
    if storage.isfile(os.path.join(path, "config.json")):
        cfg = encoder_config_from_hf(path, mel=False, exits=(), **overrides)
        params = load_hf_params(path, cfg)
        tok_dir = tokenizer_dir or path
        max_len, prefixes, default_dim = _hf_sentence_settings(path)
        mrl_min, step = MRL_MIN_DIM, None
    else:
        config, params, step = checkpoint.load_params(path)
        cfg = dataclasses.replace(EncoderConfig.from_config(config.model), **overrides)
        tok_dir, max_len, prefixes = _training_tokenizer(config, tokenizer_dir, path)
        mrl_min = int(config.loss.mrl_min_dim) if "loss" in config else MRL_MIN_DIM
    try:
        tokenizer = load_tokenizer(tok_dir)
    except TokenizerError as e:
        raise EncodeError(f"{e}; pass tokenizer_dir= (CLI: --tokenizer_dir)") from e
    if max_seq_length is not None:
        max_len = int(max_seq_length)
    if problem := max_seq_length_problem(max_len):
        raise EncodeError(problem)
    cfg = _runnable_attention(cfg, attention is not None, path, max_len)
    if device_put:  # once, not on every batch: replicated on every local device
        params = replicate(params, local_mesh())
    return Encoder(params=params, cfg=cfg, tokenizer=tokenizer, max_seq_length=max_len,
                   mrl_min_dim=mrl_min, prefixes=prefixes, source=path, step=step,
                   train_config=config, default_dim=default_dim)


def _runnable_attention(cfg, chosen: bool, path: str, max_len: int):
    """cfg, with the portable `dense` kernel if the saved one cannot run on this platform.

    A model trained with a GPU kernel still encodes on a CPU: every kernel computes the same
    function (tests/test_attention_kernels.py), so only speed changes, and a note says so.
    A kernel the caller chose explicitly is never replaced: that is an error instead.
    "auto" is chosen for this platform as training does, checked at the longest row
    length encode uses (a power of two >= max_len).
    """
    platform = jax.devices()[0].platform
    if cfg.attention == AUTO:
        rows = max(SPLASH_LANES, 1 << (max_len - 1).bit_length())
        choice = choose_for_devices(AUTO, cfg, rows, jax.local_devices())
        print(f"note: attention {choice.line()}", file=sys.stderr)
        return dataclasses.replace(cfg, attention=choice.kernel)
    try:
        check_platform(cfg.attention, platform)
        return cfg
    except ValueError as e:
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
    if storage.isfile(st):
        max_len = int(json.loads(storage.read_text(st)).get("max_seq_length") or max_len)
    st = os.path.join(path, "config_sentence_transformers.json")
    if storage.isfile(st):
        meta = json.loads(storage.read_text(st))
        truncate_dim = meta.get("truncate_dim")
        for name, text in (meta.get("prompts") or {}).items():
            for role, words in (("query", ("query",)), ("document", ("document", "passage"))):
                for w in words:
                    if name == w or name.endswith("_" + w):
                        key = "default" if name == w else name[:-len(w) - 1]
                        prefixes.setdefault(key, {"query": "", "document": ""})[role] = text
    return max_len, prefixes, truncate_dim


# --------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how: `load`'s arguments, as the tools' flags give them
    (mlembed_jax/cli.py add_model_flags). path: a training workdir, checkpoints/<step>, or
    an HF Qwen3 directory; the others override what the model says (None: keep it)."""

    path: str
    tokenizer_dir: str | None = None
    max_seq_length: int | None = None
    compute_dtype: str | None = None

    def load(self) -> Encoder:
        return load(self.path, tokenizer_dir=self.tokenizer_dir,
                    max_seq_length=self.max_seq_length, compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """Where in the three dimensions to embed, and how (cli.py add_point_flags and
    add_model_flags). rank / exit / dim: None = the full model (an export's truncate_dim for
    dim); allow_untrained: accept points off the trained sets; batch_tokens: tokens per
    pack, one pack per device; progress: progress bars."""

    rank: int | None = None
    exit: int | None = None
    dim: int | None = None
    allow_untrained: bool = False
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    progress: bool = True


# --------------------------------------------------------------------------- CLI

def read_texts(path: str, field: str = "text", id_field: str | None = None
               ) -> tuple[list[str], list | None]:
    """Texts (and ids) from a file: .jsonl -> one JSON object (or string) per line, text in
    `field`; anything else -> one text per line. Errors name the file and the line."""
    texts, ids, _ = read_texts_with_lines(path, field, id_field)
    return texts, ids


def read_texts_with_lines(path: str, field: str = "text", id_field: str | None = None
                          ) -> tuple[list[str], list | None, list[int]]:
    """`read_texts`, plus the line number of each text in the file (1-based)."""
    storage.check_location(path, "--input")
    if not storage.isfile(path):
        raise EncodeError(f"input file {path!r} does not exist")
    if not path.endswith(".jsonl"):
        texts = storage.read_text(path).splitlines()
        return (texts, ([str(i) for i in range(len(texts))] if id_field else None),
                list(range(1, len(texts) + 1)))
    texts, ids, lines = [], [] if id_field else None, []
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
        lines.append(lineno)
        if ids is not None:
            ids.append(ident)
    return texts, ids, lines


OUTPUT_FORMATS = (".npy", ".parquet")


def check_output(path: str) -> None:
    """EncodeError unless `path` names a format write_embeddings writes (before any work)."""
    if not path.endswith(OUTPUT_FORMATS):
        raise EncodeError(f"--output {path!r} must end in .npy or .parquet (the formats "
                          "encode writes)")


def truncated_texts(model: Encoder, texts: Sequence[str], ids: Sequence[np.ndarray],
                    prefix: str = "") -> list[int]:
    """Indices of the texts that tokenisation cut to max_seq_length (EOS included).

    ids: `model.tokenize(texts, prefix)`. Only texts that reached the limit are tokenised
    again, one token further, to tell a cut text from one that fits exactly."""
    full = [i for i, t in enumerate(ids) if len(t) >= model.max_seq_length]
    if not full:
        return []
    longer = encode_texts(model.tokenizer, [prefix + texts[i] for i in full],
                          model.max_seq_length + 1)
    return [i for i, t in zip(full, longer) if len(t) > model.max_seq_length]


def write_embeddings(path: str, emb: np.ndarray, ids: list | None = None) -> None:
    """[n, dim] float32 -> .npy (the array) or .parquet (columns id, embedding); local or a
    URL. Locally the file appears complete or not at all (a temporary file renamed over it,
    removed if the write fails)."""
    check_output(path)
    storage.makedirs(os.path.dirname(storage.absolute(path)))
    tmp = path if storage.is_url(path) else f"{path}.tmp-{os.getpid()}"
    try:
        with storage.open(tmp, "wb") as f:
            if path.endswith(".npy"):
                np.save(f, emb)
            else:
                n, d = emb.shape
                flat = pa.array(emb.reshape(-1), pa.float32())
                col = pa.FixedSizeListArray.from_arrays(flat, d)
                names = [str(i) for i in (ids if ids is not None else range(n))]
                pq.write_table(pa.table({"id": pa.array(names, pa.string()),
                                         "embedding": col}), f)
            if not storage.is_url(path):
                f.flush()
                os.fsync(f.fileno())
        if tmp != path:
            os.replace(tmp, path)
    except BaseException:
        if tmp != path and os.path.exists(tmp):
            os.remove(tmp)
        raise


def _where(path: str, lines: list[int], indices: list[int]) -> str:
    return f"{path}:{lines[indices[0]]}" + (f" and {len(indices) - 1} more"
                                            if len(indices) > 1 else "")


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m mlembed_jax.encode`."""
    from mlembed_jax import cli

    p = argparse.ArgumentParser(prog="python -m mlembed_jax.encode",
                                description="Embed a text or JSONL file with a trained model.")
    cli.add_model_flags(p)
    p.add_argument("--input", required=True, help=".jsonl (one object per line) or a text "
                   "file (one text per line)")
    cli.add_output_flag(p, directory=False, help=".npy or .parquet")
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--id_field", default="_id", help="JSONL field copied to the parquet id "
                   "column (the line's index if absent)")
    cli.add_point_flags(p)
    p.add_argument("--prefix", default="", help="instruction prefix put before every text")
    return p


def main(argv: list[str] | None = None) -> int:
    from mlembed_jax import cli

    a = parser().parse_args(argv)
    made = missing_dirs(os.path.dirname(storage.absolute(a.output)))
    try:
        check_output(a.output)
        writable_file(a.output, "--output")
        texts, ids, lines = read_texts_with_lines(a.input, a.field, a.id_field)
        model = cli.model_settings(a).load()
        point = cli.encode_settings(a)
        rank, exit, dim = model.check(point.rank, point.exit, point.dim, point.allow_untrained)
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            print(f"warning: {len(empty)} of {len(texts)} texts are empty or blank "
                  f"({_where(a.input, lines, empty)}); each is embedded as "
                  f"{'the prefix and ' if a.prefix else ''}EOS alone, one row per line as "
                  "always", file=sys.stderr)
        token_ids = model.tokenize(texts, a.prefix)
        cut = truncated_texts(model, texts, token_ids, a.prefix)
        if cut:
            print(f"note: {len(cut)} of {len(texts)} texts are longer than max_seq_length="
                  f"{model.max_seq_length} tokens (EOS included) and were truncated to it, as "
                  f"in training ({_where(a.input, lines, cut)}); raise --max_seq_length to "
                  "keep more", file=sys.stderr)
        emb = model.encode_ids(token_ids, rank=rank, exit=exit, dim=dim,
                               batch_tokens=point.batch_tokens,
                               allow_untrained=point.allow_untrained, progress=point.progress)
        write_embeddings(a.output, emb, ids)
    except (ValueError, OSError) as e:  # EncodeError, CheckpointError, ConfigError, disk
        if isinstance(e, NonFiniteEmbeddings):  # name the input line, not the index
            e = str(e).replace(f"(first: text {e.first};", f"(first: {a.input}:"
                               f"{lines[e.first]};", 1)
        remove_empty(made)  # the directories writable_file made for the output
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
