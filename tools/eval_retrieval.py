"""Retrieval quality of a model at one (MEL rank, MLL exit, MRL dim): nDCG@10, Recall@100, MRR@10.

    python tools/eval_retrieval.py --model=runs/demo --beir_dir=/data/beir/scifact \
        [--split=test] [--rank=256] [--exit=8] [--dim=128] [--output=scifact.json]
    python tools/eval_retrieval.py --model=runs/demo --heldout     # the run's held-out split

--model: a training workdir, WORKDIR/checkpoints/<step>, or a Hugging Face Qwen3 directory.
--beir_dir: a directory (local or gs://) in the BEIR layout (corpus.jsonl, queries.jsonl,
qrels/<split>.tsv); nothing is downloaded. --heldout: the in-domain set of the checkpoint's
own held-out split (training checkpoints only; see eval/retrieval.py heldout_sets).
Search is exact (blocked matrix products). The JSON result holds the metrics, the point
evaluated, the set's sizes and what loading skipped (qrels rows with unknown ids).
--cache_dir DIR: embeddings are kept in DIR (mlembed_jax/embedding_store.py) and reused by
later runs at the same point and by tools/mine_negatives.py --cache_dir; only texts not in
it are encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mlembed_jax import cli, storage
from mlembed_jax.cli import missing_dirs, remove_empty, writable_file
from mlembed_jax.embedding_store import EmbeddingStore
from mlembed_jax.eval import retrieval as rev


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_flags(ap)
    cli.add_eval_set_flags(ap)
    cli.add_point_flags(ap)
    cli.add_output_flag(ap, directory=False, required=False,
                        help="JSON result file (default: print only)")
    ap.add_argument("--cache_dir", default="", help="embedding store: reuse and add to the "
                    "embeddings of earlier runs of this model at this point")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    made = missing_dirs(os.path.dirname(os.path.abspath(a.output))) if a.output else []
    try:
        if a.output:
            writable_file(a.output, "--output")
        model, sets = cli.load_model_and_sets(a)
        point = cli.encode_settings(a)
        rank, exit, dim = model.check(point.rank, point.exit, point.dim, point.allow_untrained)
        store = (EmbeddingStore(a.cache_dir, model, rank=rank, exit=exit, dim=dim,
                                allow_untrained=point.allow_untrained) if a.cache_dir else None)
        results = []
        for s in sets:
            m = rev.evaluate(model, s, rank=rank, exit=exit, dim=dim,
                             allow_untrained=point.allow_untrained,
                             batch_tokens=point.batch_tokens, progress=point.progress,
                             store=store)
            results.append({"dataset": s.name, "metrics": m, "data": s.info})
            print(f"{s.name}: nDCG@10 {m['ndcg@10']:.4f}  Recall@100 {m['recall@100']:.4f}  "
                  f"MRR@10 {m['mrr@10']:.4f}  ({m['num_queries']} queries, {m['num_docs']} "
                  f"docs; rank {rank}, exit {exit}, dim {dim})")
    except (ValueError, OSError) as e:  # RetrievalDataError, EncodeError, CheckpointError
        remove_empty(made)  # NaN embeddings (NonFiniteEmbeddings) end here too: no output
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"model": os.path.abspath(a.model), "step": model.step,
           "point": {"rank": rank, "exit": exit, "dim": dim}, "results": results,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if a.output:  # complete or absent (a temporary file renamed over it)
        try:
            storage.write_text_atomic(json.dumps(out, indent=1), a.output)
        except OSError as e:
            print(f"error: cannot write --output {a.output!r}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
