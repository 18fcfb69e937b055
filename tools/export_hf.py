"""Export a trained checkpoint to Hugging Face / sentence-transformers at a 3D-ML size.

    python tools/export_hf.py --checkpoint WORKDIR[/STEP] --out DIR \\
        [--rank R] [--layers K] [--dim M] [--mode compat|factorized] \\
        [--tokenizer DIR] [--dtype bf16|fp32] [--overwrite]

DIR then loads with `SentenceTransformer(DIR)` or `AutoModel.from_pretrained(DIR)`; see its
README.md. Without --rank/--layers/--dim the trained full size is exported.
"""

import argparse
import sys
import warnings

from mlembed_jax.checkpoint.reader import CheckpointError
from mlembed_jax.export import ExportError, ExportWarning, export_checkpoint
from mlembed_jax.storage import StorageError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir (its latest checkpoint), WORKDIR/STEP or "
                    "WORKDIR/checkpoints/STEP")
    ap.add_argument("--out", required=True,
                    help="output directory, local or gs:// (must not exist, unless --overwrite)")
    ap.add_argument("--rank", type=int, help="MEL rank R <= r_max (default r_max)")
    ap.add_argument("--layers", type=int, help="keep the first K layers (default all L)")
    ap.add_argument("--dim", type=int, help="embedding dim M <= d: sentence-transformers' "
                    "truncate_dim (default d)")
    ap.add_argument("--mode", choices=("compat", "factorized"), default="compat",
                    help="factorized also writes the MEL factors U, V (default compat)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the one the training "
                    "data was prepared with, from prepared.json)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="weight dtype (default bf16)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = ap.parse_args(argv)

    def show(message, category, *_args, **_kwargs):
        prefix = "warning" if issubclass(category, ExportWarning) else category.__name__
        print(f"{prefix}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.simplefilter("always", ExportWarning)
        try:
            summary = export_checkpoint(
                args.checkpoint, args.out, rank=args.rank, layers=args.layers, dim=args.dim,
                mode=args.mode, tokenizer_dir=args.tokenizer, dtype=args.dtype,
                overwrite=args.overwrite)
        except (ExportError, CheckpointError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # e.g. --out on a read-only or full disk
            print(f"error: cannot write --out {args.out!r}: {e.strerror or e}", file=sys.stderr)
            return 2
    cut = summary["cut"]
    print(f"exported step {summary['step']} at rank R={cut.rank}, layers K={cut.layers}, "
          f"dim M={cut.dim} to {summary['out_dir']}")
    for name in summary["files"]:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
