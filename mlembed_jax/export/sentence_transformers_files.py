"""sentence-transformers files of an export: Transformer -> last-token Pooling -> Normalize.

Written in the classic layout (module types `sentence_transformers.models.*`), which every
sentence-transformers release since 2.x loads, the current ones through their aliases.
"""

from __future__ import annotations

import json
import os

from mlembed_jax import storage

# Legacy boolean keys: the one layout every sentence-transformers version reads.
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                  "weightedmean_tokens", "lasttoken")


def prompts_from_manifest(manifest: dict) -> dict[str, str]:
    """Instruction prefixes of the training manifest as sentence-transformers prompts.

    Each dataset's non-empty prefixes become "<dataset>_query" / "<dataset>_document". When all
    datasets share one non-empty query (document) prefix it is also "query" ("document"), the
    names `encode_query` / `encode_document` use.
    """
    prompts = {}
    for name, spec in manifest.items():
        if spec.query_prefix:
            prompts[f"{name}_query"] = spec.query_prefix
        if spec.document_prefix:
            prompts[f"{name}_document"] = spec.document_prefix
    for role, attr in (("query", "query_prefix"), ("document", "document_prefix")):
        values = {getattr(s, attr) for s in manifest.values()}
        if len(values) == 1 and "" not in values:
            prompts[role] = values.pop()
    return prompts


def _dump(path: str, obj) -> None:
    storage.write_text_atomic(json.dumps(obj, indent=2, ensure_ascii=False), path)


def write_sentence_transformers_files(out_dir: str, hidden_size: int, max_seq_length: int,
                                      prompts: dict[str, str], truncate_dim: int | None) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling/config.json, 2_Normalize/ and
    config_sentence_transformers.json (prompts, cosine similarity, truncate_dim)."""
    _dump(os.path.join(out_dir, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ])
    _dump(os.path.join(out_dir, "sentence_bert_config.json"),
          {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    storage.makedirs(os.path.join(out_dir, "1_Pooling"))
    # Last-token pooling takes the last position the attention mask keeps, so it finds the
    # appended EOS with right padding and with left padding alike.
    pooling = {"word_embedding_dimension": int(hidden_size), "include_prompt": True}
    pooling.update({f"pooling_mode_{m}": m == "lasttoken" for m in _POOLING_MODES})
    _dump(os.path.join(out_dir, "1_Pooling", "config.json"), pooling)
    storage.makedirs(os.path.join(out_dir, "2_Normalize"))  # empty: no object on gs://
    _dump(os.path.join(out_dir, "config_sentence_transformers.json"), {
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        # sentence-transformers truncates after the Normalize module: the cut vectors are not
        # unit length, but cosine similarity (the model's similarity) does not care.
        "truncate_dim": truncate_dim,
    })
