"""Command-line pieces shared by tools/eval_retrieval.py and tools/matryoshka_report.py: the
flags that name a model and an evaluation set, and loading both."""

from __future__ import annotations

import argparse
import sys

from mlembed_jax import encode as encode_lib
from mlembed_jax.data.text_encoding import choose_prefixes
from mlembed_jax.eval import retrieval as rev


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared with tools/matryoshka_report.py: the model and the evaluation set."""
    ap.add_argument("--model", required=True, help="training workdir, checkpoints/<step>, or "
                    "HF Qwen3 directory")
    ap.add_argument("--beir_dir", default="", help="BEIR-layout directory (local or gs://)")
    ap.add_argument("--split", default="test", help="qrels/<split>.tsv")
    ap.add_argument("--heldout", action="store_true",
                    help="evaluate on the checkpoint's held-out split (its retrieval datasets)")
    ap.add_argument("--query_prefix", default=None, help="instruction before each query "
                    "(default: the model's 'query' prompt if it has one, else none)")
    ap.add_argument("--document_prefix", default=None, help="instruction before each doc")
    ap.add_argument("--max_queries", type=int, default=0, help="seeded query sample; 0 = all")
    ap.add_argument("--max_corpus", type=int, default=0,
                    help="judged docs + a seeded sample of the rest; 0 = all (full corpus)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_tokens", type=int, default=encode_lib.DEFAULT_BATCH_TOKENS)
    ap.add_argument("--tokenizer_dir", default=None)
    ap.add_argument("--max_seq_length", type=int, default=None)
    ap.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--allow_untrained", action="store_true",
                    help="allow rank/exit/dim values the model was not trained at")


def load_model_and_sets(a) -> tuple[encode_lib.Encoder, list[rev.RetrievalSet]]:
    """The Encoder and the tokenised evaluation set(s) the flags name."""
    if bool(a.beir_dir) == bool(a.heldout):
        raise rev.RetrievalDataError("give exactly one of --beir_dir=DIR or --heldout")
    model = encode_lib.load(a.model, tokenizer_dir=a.tokenizer_dir,
                            max_seq_length=a.max_seq_length, compute_dtype=a.compute_dtype)
    if a.heldout:
        if model.train_config is None:
            raise rev.RetrievalDataError("--heldout needs a training checkpoint (its config "
                                         "names the data); an HF directory has none")
        sets = rev.heldout_sets(model.train_config)
        if a.max_queries:
            sets = [rev.cap_queries(s, a.max_queries, a.seed) for s in sets]
        return model, sets
    s = rev.load_beir(a.beir_dir, a.split, max_queries=a.max_queries, max_corpus=a.max_corpus,
                      seed=a.seed)
    note = rev.describe_load(s.info)
    if note:
        print(f"{a.beir_dir}: {note}", file=sys.stderr)
    chosen = choose_prefixes(model.prefixes, query=a.query_prefix, document=a.document_prefix)
    qp, dp = chosen["query"], chosen["document"]
    s = rev.tokenize_set(s, model.tokenize, qp, dp)
    s.info.update(query_prefix=qp, document_prefix=dp)
    return model, [s]
