"""Retrieval quality of a model at one (MEL rank, MLL exit, MRL dim): nDCG@10, Recall@100, MRR@10.

    python tools/eval_retrieval.py --model=runs/demo --beir_dir=/data/beir/scifact \
        [--split=test] [--rank=256] [--exit=8] [--dim=128] [--output=scifact.json]
    python tools/eval_retrieval.py --model=runs/demo --heldout     # the run's held-out split

--model: a training workdir, WORKDIR/checkpoints/<step>, or a Hugging Face Qwen3 directory.
--beir_dir: a local directory in the BEIR layout (corpus.jsonl, queries.jsonl,
qrels/<split>.tsv); nothing is downloaded. --heldout: the in-domain set of the checkpoint's
own held-out split (training checkpoints only; see retrieval_eval.heldout_sets).
Search is exact (blocked matrix products). The JSON result holds the metrics, the point
evaluated, the set's sizes and what loading skipped (qrels rows with unknown ids).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlembed_jax import encode as encode_lib  # noqa: E402
from mlembed_jax import retrieval_eval as rev  # noqa: E402


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared with tools/matryoshka_report.py: the model and the evaluation set."""
    ap.add_argument("--model", required=True, help="training workdir, checkpoints/<step>, or "
                    "HF Qwen3 directory")
    ap.add_argument("--beir_dir", default="", help="local BEIR-layout directory")
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
            from mlembed_jax.periodic_eval import _cap_queries

            sets = [_cap_queries(s, a.max_queries, a.seed) for s in sets]
        return model, sets
    s = rev.load_beir(a.beir_dir, a.split, max_queries=a.max_queries, max_corpus=a.max_corpus,
                      seed=a.seed)
    note = rev.describe_load(s.info)
    if note:
        print(f"{a.beir_dir}: {note}", file=sys.stderr)
    prompts = next(iter(model.prefixes.values()), {}) if len(model.prefixes) == 1 else {}
    qp = a.query_prefix if a.query_prefix is not None else prompts.get("query", "")
    dp = a.document_prefix if a.document_prefix is not None else prompts.get("document", "")
    s = rev.tokenize_set(model, s, qp, dp)
    s.info.update(query_prefix=qp, document_prefix=dp)
    return model, [s]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--rank", type=int, default=None, help="MEL rank (default r_max)")
    ap.add_argument("--exit", type=int, default=None, help="MLL exit (default: last layer)")
    ap.add_argument("--dim", type=int, default=None, help="MRL dim (default: hidden size)")
    ap.add_argument("--output", default="", help="JSON result file (default: print only)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    try:
        model, sets = load_model_and_sets(a)
        rank, exit, dim = model.check(a.rank, a.exit, a.dim, a.allow_untrained)
        results = []
        for s in sets:
            m = rev.evaluate(model, s, rank=rank, exit=exit, dim=dim,
                             allow_untrained=a.allow_untrained, batch_tokens=a.batch_tokens,
                             progress=not a.quiet)
            results.append({"dataset": s.name, "metrics": m, "data": s.info})
            print(f"{s.name}: nDCG@10 {m['ndcg@10']:.4f}  Recall@100 {m['recall@100']:.4f}  "
                  f"MRR@10 {m['mrr@10']:.4f}  ({m['num_queries']} queries, {m['num_docs']} "
                  f"docs; rank {rank}, exit {exit}, dim {dim})")
    except (ValueError, FileNotFoundError) as e:  # RetrievalDataError, EncodeError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"model": os.path.abspath(a.model), "step": model.step,
           "point": {"rank": rank, "exit": exit, "dim": dim}, "results": results,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
