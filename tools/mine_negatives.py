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
import functools
import sys


def _none_or_float(text: str):
    return None if text.lower() in ("none", "off") else float(text)


def parser() -> argparse.ArgumentParser:
    # jax is slow to import, and mining imports it
    from mlembed_jax import cli
    from mlembed_jax.mining import IF_SHORT, SAMPLING, MiningJob, MiningSettings

    job = functools.partial(cli.field_default, MiningJob)
    rule = functools.partial(cli.field_default, MiningSettings)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_flags(ap)
    ap.add_argument("--input", required=True, nargs="+", help="parquet files or directories")
    cli.add_output_flag(ap, directory=True, help="one parquet per input, under its name")
    ap.add_argument("--corpus", nargs="*", default=job("corpus_files"),
                    help="extra candidate texts: .parquet (--corpus_field), .jsonl (BEIR "
                    "corpus) or one text per line")
    ap.add_argument("--corpus_field", default=job("corpus_field"))
    ap.add_argument("--negatives", type=int, default=rule("negatives"),
                    help="K: negative_1..K per row")
    ap.add_argument("--depth", type=int, default=rule("depth"), help="candidates per query")
    ap.add_argument("--max_score_ratio", type=_none_or_float, default=rule("max_score_ratio"),
                    help="drop candidates scoring above this x the positive's score "
                    "(TopK-PercPos); 'none' = off")
    ap.add_argument("--margin", type=_none_or_float, default=rule("margin"),
                    help="drop candidates scoring above the positive's score - margin")
    ap.add_argument("--rank_min", type=int, default=rule("rank_min"),
                    help="skip the nearest rank_min")
    ap.add_argument("--rank_max", type=int, default=rule("rank_max"), help="ignore ranks >= "
                    "this (default: --depth)")
    ap.add_argument("--sampling", choices=SAMPLING, default=rule("sampling"))
    ap.add_argument("--seed", type=int, default=rule("seed"))
    ap.add_argument("--if_short", choices=IF_SHORT, default=rule("if_short"),
                    help="rows with fewer than K survivors")
    ap.add_argument("--min_negatives", type=int, default=rule("min_negatives"),
                    help="rows kept by --if_short=shrink")
    ap.add_argument("--query_prefix", default=job("query_prefix"), help="default: the "
                    "--manifest entry's, else the model's prompt")
    ap.add_argument("--document_prefix", default=job("document_prefix"))
    ap.add_argument("--manifest", default=job("manifest"), help="the prepare_data manifest: "
                    "per-dataset prefixes")
    cli.add_point_flags(ap)
    ap.add_argument("--cache_dir", default=job("cache_dir"), help="embedding store shared "
                    "with tools/eval_retrieval.py --cache_dir")
    ap.add_argument("--summary", default=job("summary_path"), help="summary JSON (default: "
                    "OUTPUT_DIR/mining_summary.json); the histogram PNG goes beside it")
    ap.add_argument("--overwrite", action="store_true", default=job("overwrite"),
                    help="replace existing outputs")
    return ap


def settings(a: argparse.Namespace):
    """(mining.MiningJob, mining.MiningSettings) of the parsed flags."""
    from mlembed_jax.mining import MiningJob, MiningSettings

    job = MiningJob(inputs=a.input, output_dir=a.output_dir, corpus_files=a.corpus,
                    corpus_field=a.corpus_field, query_prefix=a.query_prefix,
                    document_prefix=a.document_prefix, manifest=a.manifest,
                    cache_dir=a.cache_dir, summary_path=a.summary, overwrite=a.overwrite)
    rules = MiningSettings(negatives=a.negatives, depth=a.depth,
                           max_score_ratio=a.max_score_ratio, margin=a.margin,
                           rank_min=a.rank_min, rank_max=a.rank_max, sampling=a.sampling,
                           seed=a.seed, if_short=a.if_short, min_negatives=a.min_negatives)
    return job, rules


def main(argv=None) -> int:
    from mlembed_jax import cli
    from mlembed_jax.mining import run

    a = parser().parse_args(argv)
    try:
        run(*settings(a), cli.model_settings(a), cli.encode_settings(a))
    except (ValueError, OSError) as e:  # MiningError, EncodeError, DataError, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
