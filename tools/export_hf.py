"""Export a trained checkpoint to Hugging Face / sentence-transformers at a 3D-ML size.

    python tools/export_hf.py --model WORKDIR[/STEP] --output_dir DIR \\
        [--rank R] [--exit K] [--dim M] [--mode compat|factorized] \\
        [--tokenizer_dir DIR] [--dtype bf16|fp32] [--overwrite] [--peft]

DIR then loads with `SentenceTransformer(DIR)` or `AutoModel.from_pretrained(DIR)`; see its
README.md. Without --rank/--exit/--dim the trained full size is exported. The old flag names
--checkpoint, --out, --layers and --tokenizer are still accepted. A LoRA checkpoint exports
merged into the weights, or with --peft as DIR/base (the base) + DIR/adapter (peft adapter,
which `SentenceTransformer(DIR/adapter)` loads together with DIR/base).
"""

import argparse
import sys
import warnings

from mlembed_jax.checkpoint.reader import CheckpointError
from mlembed_jax.export import ExportError, ExportWarning, export_checkpoint
from mlembed_jax.storage import StorageError


def parser() -> argparse.ArgumentParser:
    from mlembed_jax import cli

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_flags(ap, model_aliases=("--checkpoint",), tokenizer_aliases=("--tokenizer",),
                        encoding=False,
                        help="training workdir (its latest checkpoint), WORKDIR/STEP or "
                        "WORKDIR/checkpoints/STEP")
    cli.add_output_flag(ap, directory=True, aliases=("--out",),
                        help="local or gs:// (must not exist, unless --overwrite)")
    cli.add_point_flags(ap, exit_aliases=("--layers",), untrained=False,
                        dim_help="MRL dim M <= d: sentence-transformers' truncate_dim "
                        "(default d)")
    ap.add_argument("--mode", choices=("compat", "factorized"), default="compat",
                    help="factorized also writes the MEL factors U, V (default compat)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="weight dtype (default bf16)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export")
    ap.add_argument("--peft", action="store_true",
                    help="LoRA checkpoints: write the base's export to OUTPUT_DIR/base and a peft "
                    "adapter directory to OUTPUT_DIR/adapter instead of the merged model")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def show(message, category, *_args, **_kwargs):
        prefix = "warning" if issubclass(category, ExportWarning) else category.__name__
        print(f"{prefix}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.simplefilter("always", ExportWarning)
        try:
            summary = export_checkpoint(
                args.model, args.output_dir, rank=args.rank, layers=args.exit, dim=args.dim,
                mode=args.mode, tokenizer_dir=args.tokenizer_dir, dtype=args.dtype,
                overwrite=args.overwrite, peft=args.peft)
        except (ExportError, CheckpointError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # e.g. --output_dir on a read-only or full disk
            print(f"error: cannot write --output_dir {args.output_dir!r}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
    cut = summary["cut"]
    print(f"exported step {summary['step']} at rank R={cut.rank}, exit K={cut.layers}, "
          f"dim M={cut.dim} to {summary['out_dir']}")
    for name in summary["files"]:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
