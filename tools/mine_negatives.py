"""Mine hard negatives for your own (query, passage) pairs, with false-negative filters.

    python tools/mine_negatives.py --model=runs/demo --input=pairs/ --output_dir=raw/ \
        [--corpus=more_passages.parquet] [--negatives=24] [--depth=128] \
        [--max_score_ratio=0.95] [--margin=0.05] [--rank_min=0 --rank_max=100] \
        [--sampling=top|random --seed=0] [--if_short=drop|repeat|shrink] \
        [--query_prefix="query: "] [--document_prefix=""] [--cache_dir=emb_cache/]

--input: parquet files (or directories of them) with columns query, passage; each becomes
OUTPUT_DIR/<same name>.parquet with negative_1..K, which tools/prepare_data.py takes as is.
--model: a training workdir, WORKDIR/checkpoints/<step>, or an HF / exported Qwen3 directory,
embedded at --rank/--exit/--dim (default: the full model). The filters, the choice among
the survivors and the short-row policy are described in mlembed_jax/mining.py. A summary
(OUTPUT_DIR/mining_summary.json, or --summary) counts what each filter removed and the rows
left short, with a histogram of positive and negative scores beside it (.png).
"""

from __future__ import annotations

import argparse
import sys


def _none_or_float(text: str):
    return None if text.lower() in ("none", "off") else float(text)


def main(argv=None) -> int:
    # jax is slow to import: --help stays fast without it
    from mlembed_jax.embedding import DEFAULT_BATCH_TOKENS
    from mlembed_jax.mining import IF_SHORT, SAMPLING, MineSettings, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="training workdir, checkpoints/<step>, or "
                    "HF / exported Qwen3 directory")
    ap.add_argument("--input", required=True, nargs="+", help="parquet files or directories")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--corpus", nargs="*", default=[], help="extra candidate texts: .parquet "
                    "(--corpus_field), .jsonl (BEIR corpus) or one text per line")
    ap.add_argument("--corpus_field", default="text")
    ap.add_argument("--negatives", type=int, default=24, help="K: negative_1..K per row")
    ap.add_argument("--depth", type=int, default=128, help="candidates per query")
    ap.add_argument("--max_score_ratio", type=_none_or_float, default=0.95,
                    help="drop candidates scoring above this x the positive's score "
                    "(TopK-PercPos); 'none' = off")
    ap.add_argument("--margin", type=_none_or_float, default=None,
                    help="drop candidates scoring above the positive's score - margin")
    ap.add_argument("--rank_min", type=int, default=0, help="skip the nearest rank_min")
    ap.add_argument("--rank_max", type=int, default=None, help="ignore ranks >= this "
                    "(default: --depth)")
    ap.add_argument("--sampling", choices=SAMPLING, default="top")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--if_short", choices=IF_SHORT, default="drop",
                    help="rows with fewer than K survivors")
    ap.add_argument("--min_negatives", type=int, default=1, help="rows kept by "
                    "--if_short=shrink")
    ap.add_argument("--query_prefix", default=None, help="default: the --manifest entry's, "
                    "else the model's prompt")
    ap.add_argument("--document_prefix", default=None)
    ap.add_argument("--manifest", default="", help="the prepare_data manifest: per-dataset "
                    "prefixes")
    ap.add_argument("--rank", type=int, default=None, help="MEL rank (default r_max)")
    ap.add_argument("--exit", type=int, default=None, help="MLL exit (default: last layer)")
    ap.add_argument("--dim", type=int, default=None, help="MRL dim (default: hidden size)")
    ap.add_argument("--allow_untrained", action="store_true")
    ap.add_argument("--cache_dir", default="", help="embedding store shared with "
                    "tools/eval_retrieval.py --cache_dir")
    ap.add_argument("--batch_tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                    help="tokens per pack (one pack per device)")
    ap.add_argument("--tokenizer_dir", default=None)
    ap.add_argument("--max_seq_length", type=int, default=None)
    ap.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--summary", default="", help="summary JSON (default: "
                    "OUTPUT_DIR/mining_summary.json); the histogram PNG goes beside it")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    settings = MineSettings(negatives=a.negatives, depth=a.depth,
                            max_score_ratio=a.max_score_ratio, margin=a.margin,
                            rank_min=a.rank_min, rank_max=a.rank_max, sampling=a.sampling,
                            seed=a.seed, if_short=a.if_short, min_negatives=a.min_negatives)
    try:
        run(a.model, a.input, a.output_dir, settings, corpus_files=a.corpus,
            corpus_field=a.corpus_field, rank=a.rank, exit=a.exit, dim=a.dim,
            allow_untrained=a.allow_untrained, query_prefix=a.query_prefix,
            document_prefix=a.document_prefix, manifest=a.manifest, cache_dir=a.cache_dir,
            batch_tokens=a.batch_tokens, tokenizer_dir=a.tokenizer_dir,
            max_seq_length=a.max_seq_length, compute_dtype=a.compute_dtype,
            summary_path=a.summary, overwrite=a.overwrite, progress=not a.quiet)
    except (ValueError, OSError) as e:  # MiningError, EncodeError, DataError, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
