"""Inspect a local Hugging Face Qwen3 directory: shapes, parameter count, embedding share.

    python tools/inspect_hf.py /path/to/Qwen3-0.6B [--tensors]

Reads config.json and the safetensors headers only (never pickle, never the model's code).
"""

import argparse
import sys

from mlembed_jax.model.hf_import import CheckpointError, hf_model_fields, summarize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--tensors", action="store_true", help="list every tensor")
    args = ap.parse_args(argv)
    try:
        s = summarize(args.model_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {args.model_dir}")
    for k, v in hf_model_fields(s.config).items():
        print(f"  {k:20s} {v}")
    print(f"tensors: {len(s.tensors)}")
    if args.tensors:
        for name, shape, dtype in s.tensors:
            print(f"  {name:60s} {str(list(shape)):>16s} {dtype}")
    print(f"parameters: {s.total_params:,}")
    print(f"embedding parameters: {s.embedding_params:,} "
          f"({100 * s.embedding_params / max(s.total_params, 1):.1f}% of all)")
    print(f"non-embedding parameters: {s.total_params - s.embedding_params:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
