"""Tokenise the recipe's parquet datasets for training (see mlembed_jax/data/prepare.py).

  python tools/prepare_data.py --input_dir data/raw --manifest data/manifest.json \
      --tokenizer /path/to/Qwen3-0.6B --output_dir data/prepared [--max_seq_length 1024] \
      [--max_rows_per_dataset 80000 --sample_seed 0]

Reruns skip datasets already prepared with the same inputs and settings.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input_dir", required=True,
                    help="one <name>.parquet per dataset (local or gs://)")
    ap.add_argument("--manifest", required=True, help="JSON/YAML: name -> task_type, prefixes")
    ap.add_argument("--tokenizer_dir", "--tokenizer", dest="tokenizer_dir", required=True,
                    help="local HF tokenizer directory (--tokenizer: its old name)")
    ap.add_argument("--output_dir", required=True, help="local or gs://")
    ap.add_argument("--max_seq_length", type=int, default=1024, help="EOS included")
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--max_rows_per_dataset", type=int, default=80_000,
                    help="keep a seeded random sample of this many rows of a bigger dataset, "
                    "as the recipe does (0 = keep every row)")
    ap.add_argument("--sample_seed", type=int, default=0, help="seed of that sample")
    args = ap.parse_args(argv)

    from mlembed_jax.cli import writable_dir
    from mlembed_jax.config import ConfigError
    from mlembed_jax.data.manifest import ManifestError
    from mlembed_jax.data.parquet_io import DataError
    from mlembed_jax.data.prepare import check_max_seq_length, prepare_data
    from mlembed_jax.data.text_encoding import TokenizerError
    from mlembed_jax.storage import StorageError

    try:
        check_max_seq_length(args.max_seq_length)  # before --output_dir is created
        writable_dir(args.output_dir, "--output_dir")
        prepare_data(args.input_dir, args.manifest, args.tokenizer_dir, args.output_dir,
                     max_seq_length=args.max_seq_length, workers=args.workers,
                     max_rows_per_dataset=args.max_rows_per_dataset,
                     sample_seed=args.sample_seed)
    except (ConfigError, DataError, ManifestError, TokenizerError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
