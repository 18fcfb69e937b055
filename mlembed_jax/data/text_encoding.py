"""Turning text into the token ids training sees: truncate, then append EOS (the recipe's rule).

The encoding never relies on the tokenizer's post-processor: it encodes without special
tokens, keeps the first `max_seq_length - 1` ids and appends `eos_token_id`, so every text
ends with EOS (the last-token pooling position) whatever the tokenizer's template says.
`truncate_then_eos` is that rule; the transformers path (`encode_texts`) and prepare_data's
worker processes (the bare `tokenizers` backend) both end in it.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np


class TokenizerError(ValueError):
    """The tokenizer directory can't be used for training data."""


def quiet_transformers() -> None:
    """Call before importing transformers. Without torch (`make demo` installs none) it
    advises on import that models are unavailable; only its tokenizers are used here."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# The files an HF tokenizer directory may hold (never the model weights beside them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")


def choose_prefixes(known: dict, dataset: str | None = None, spec=None,
                    query: str | None = None, document: str | None = None) -> dict[str, str]:
    """The instruction prefixes a dataset's texts are embedded with -> {"query", "document"}.

    Each role takes the explicit value (a flag) unless it is None; else the dataset's
    manifest entry `spec` (a DatasetSpec, None if none); else what the model knows (`known`:
    dataset -> {"query", "document"}, as Encoder.prefixes): that dataset's, else its
    "default" prompts, else its only entry, else "".
    """
    if spec is not None:
        base = {"query": spec.query_prefix, "document": spec.document_prefix}
    else:
        base = (known.get(dataset) if dataset is not None else None) or known.get("default") \
            or (next(iter(known.values())) if len(known) == 1 else {})
    return {"query": base.get("query", "") if query is None else query,
            "document": base.get("document", "") if document is None else document}


def load_tokenizer(tokenizer_dir: str):
    """Loads an HF tokenizer directory (offline; local or a URL) and checks it has an EOS
    token. transformers reads local files only, so a URL's few tokenizer files (small next
    to the model beside them) are copied to a temporary directory first."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    from transformers import AutoTokenizer  # slow to import: data workers never need it

    from mlembed_jax import storage

    try:
        with storage.local_copy(tokenizer_dir, TOKENIZER_FILES) as local:
            tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except Exception as e:  # re-raised with the directory named
        raise TokenizerError(f"could not load tokenizer from {tokenizer_dir!r}: {e}") from e
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {tokenizer_dir!r} has no EOS token (eos_token is None); every text "
            "needs EOS appended for last-token pooling. Set eos_token in its "
            "tokenizer_config.json (Qwen3 uses '<|im_end|>').")
    return tok


def max_seq_length_problem(max_seq_length: int, name: str = "max_seq_length") -> str | None:
    """Why `max_seq_length` (called `name`, e.g. a flag) cannot be used, or None: each text
    keeps at least one token before its EOS. Callers raise their own error type."""
    if max_seq_length >= 2:
        return None
    return (f"{name} {max_seq_length} is too small: each text keeps max_seq_length - 1 "
            "tokens and then EOS, so it must be at least 2 (the recipe uses 1024)")


def truncate_then_eos(id_lists: Iterable[Sequence[int]], max_seq_length: int,
                      eos: int) -> list[np.ndarray]:
    """The recipe's rule, once for every tokenizer path: n id lists (encoded without special
    tokens, not truncated) -> n int32 arrays, each its first max_seq_length - 1 ids then
    EOS (length <= max_seq_length)."""
    keep = max_seq_length - 1
    out = []
    for ids in id_lists:
        ids = ids[:keep]
        arr = np.empty(len(ids) + 1, np.int32)
        arr[:-1] = ids
        arr[-1] = eos
        out.append(arr)
    return out


def encode_texts(tokenizer, texts: list[str], max_seq_length: int) -> list[np.ndarray]:
    """Each text -> int32 ids of length <= max_seq_length, EOS last."""
    problem = max_seq_length_problem(max_seq_length)
    if problem:
        raise ValueError(problem)
    # No tokenizer-side truncation: `truncate_then_eos` cuts, whatever truncation_side says.
    # verbose=False: texts longer than model_max_length are expected here, not a mistake.
    enc = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return truncate_then_eos(enc, max_seq_length, tokenizer.eos_token_id)
