"""The export's tokenizer: the training tokenizer, set to append EOS exactly as training did.

Training never relies on a tokenizer's post-processor: text_encoding.encode_texts encodes
without special tokens, keeps max_seq_length - 1 ids and appends the EOS id. Users of the
export (transformers, sentence-transformers) call the tokenizer with its special tokens on, so
the exported tokenizer.json gets a post-processor that appends that EOS and nothing else, and
its tokenizer_config.json sets model_max_length = max_seq_length (the fast tokenizer keeps
room for the appended EOS when it truncates). `check_same_ids` then proves the two agree.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer, processors

from mlembed_jax import storage
from mlembed_jax.data import text_encoding
from mlembed_jax.export.errors import ExportError

# Config keys dropped from the source tokenizer_config.json: custom code, and keys that make
# transformers rebuild or bypass the post-processor (add_*_token are set explicitly below).
_DROPPED_KEYS = ("auto_map", "add_bos_token", "add_eos_token", "tokenizer_file", "processor_class")


def _eos_post_processor(tokenizer_json: dict, eos: str, eos_id: int):
    """Keeps the source's ByteLevel offset fix-ups (they add no tokens) and appends EOS."""
    old = tokenizer_json.get("post_processor") or {}
    parts = old.get("processors", []) if old.get("type") == "Sequence" else [old]
    keep = [processors.ByteLevel(trim_offsets=p.get("trim_offsets", True),
                                 add_prefix_space=p.get("add_prefix_space", True))
            for p in parts if p.get("type") == "ByteLevel"]
    template = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(eos, eos_id)])
    return processors.Sequence(keep + [template]) if keep else template


def write_tokenizer(src_dir: str, out_dir: str, eos_id: int, max_seq_length: int,
                    model_vocab_size: int) -> dict:
    """Writes tokenizer.json and tokenizer_config.json to out_dir; returns
    {"eos_token", "eos_token_id", "pad_token", "pad_token_id"} for config.json."""
    path = os.path.join(src_dir, "tokenizer.json")
    if not storage.isfile(path):
        raise ExportError(f"tokenizer {src_dir!r} has no tokenizer.json; the export needs a "
                          "fast (tokenizers) tokenizer, as tools/prepare_data.py uses")
    text = storage.read_text(path)
    tok = Tokenizer.from_str(text)
    if tok.get_vocab_size(with_added_tokens=True) > model_vocab_size:
        raise ExportError(f"tokenizer {src_dir!r} has {tok.get_vocab_size(True)} tokens but "
                          f"the model's vocabulary is {model_vocab_size}; it is not the "
                          "tokenizer this model was trained with")
    eos = tok.id_to_token(eos_id)
    if eos is None:
        raise ExportError(f"tokenizer {src_dir!r} has no token with the training EOS id {eos_id}")
    tok.post_processor = _eos_post_processor(json.loads(text), eos, eos_id)
    tok.no_truncation()  # truncation and padding come from the caller (model_max_length)
    tok.no_padding()
    storage.write_text_atomic(tok.to_str(pretty=True), os.path.join(out_dir, "tokenizer.json"))

    cfg = {}
    cfg_path = os.path.join(src_dir, "tokenizer_config.json")
    if storage.isfile(cfg_path):
        cfg = {k: v for k, v in json.loads(storage.read_text(cfg_path)).items()
               if k not in _DROPPED_KEYS}
    pad = cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad is None or tok.token_to_id(pad) is None:
        pad = eos  # padding is masked out, so any token works; EOS always exists
    cfg.update({
        # The generic class loads tokenizer.json as written, in transformers 4 and 5 alike;
        # model-specific classes (e.g. Qwen2Tokenizer) may rebuild the post-processor.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        # transformers 5 rebuilds the post-processor from these when present; set them so a
        # rebuild gives the same "$A EOS" template.
        "add_bos_token": False,
        "add_eos_token": True,
        "model_max_length": int(max_seq_length),
        "padding_side": "right",
        "truncation_side": "right",  # training keeps the first tokens
    })
    storage.write_text_atomic(json.dumps(cfg, indent=2, ensure_ascii=False),
                              os.path.join(out_dir, "tokenizer_config.json"))
    return {"eos_token": eos, "eos_token_id": int(eos_id), "pad_token": pad,
            "pad_token_id": int(tok.token_to_id(pad))}


def probe_texts(max_seq_length: int) -> list[str]:
    """Short multilingual texts and one far longer than max_seq_length (truncation)."""
    return ["Hello world", "Grüße aus Köln", "東京は日本の首都です", "  spaces  and\ttabs\n",
            "مرحبا بالعالم", "def f(x): return x ** 2", "", "calendar: Tuesday",
            " ".join(["embedding"] * (2 * max_seq_length))]


def check_same_ids(training_tokenizer_dir: str, export_dir: str, max_seq_length: int,
                   texts: list[str] | None = None) -> None:
    """Raises ExportError unless the exported tokenizer, called as sentence-transformers calls
    it (special tokens on, truncation at model_max_length), gives prepare_data's ids."""
    text_encoding.quiet_transformers()
    from transformers import AutoTokenizer  # slow to import: only the export's check needs it

    texts = probe_texts(max_seq_length) if texts is None else texts
    want = text_encoding.encode_texts(text_encoding.load_tokenizer(training_tokenizer_dir),
                                      texts, max_seq_length)
    with storage.local_copy(export_dir, text_encoding.TOKENIZER_FILES) as local:
        got = AutoTokenizer.from_pretrained(local, local_files_only=True)(
            texts, truncation=True)["input_ids"]
    for text, w, g in zip(texts, want, got):
        if not np.array_equal(np.asarray(g), w):
            raise ExportError(f"exported tokenizer gives ids {list(g)[:12]}... for {text[:40]!r},"
                              f" training gave {w.tolist()[:12]}...; the tokenizer does not "
                              "reproduce training's 'truncate, then append EOS'")
