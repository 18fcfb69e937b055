"""Write the manifest for a folder of the released training parquet files.

The task type of each dataset comes from the reference code's table of its 502 training
dataset names (mlembed_jax/data/reference_task_types.json), or from --task_types FILE of the
same form ({"task_types": {name: task type}}). A file whose name is not in the table is an
error that lists every such file.

  python tools/make_manifest.py --input_dir parquet/ --output manifest.json
  python tools/prepare_data.py --input_dir parquet/ --manifest manifest.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _negative_count(path: str) -> int:
    """Negative columns of a parquet file, from its schema only (the footer)."""
    import pyarrow.parquet as pq

    from mlembed_jax.data.parquet_io import DataError, negative_columns

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # arrow raises several types for bad files
        raise DataError(f"{path}: cannot read parquet schema (corrupted or truncated?): "
                        f"{type(e).__name__}: {e}") from e
    return len(negative_columns(names, path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input_dir", required=True, help="one <name>.parquet per dataset")
    ap.add_argument("--output", "--out", dest="output", required=True,
                    help="the manifest JSON to write (--out: its old name)")
    ap.add_argument("--task_types", default="", help="JSON {task_types: {name: type}}; "
                    "default: the reference code's 502 names")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = ap.parse_args(argv)

    from mlembed_jax.data import manifest as manifest_lib
    from mlembed_jax.data.parquet_io import DataError

    try:
        if not os.path.isdir(args.input_dir):
            raise manifest_lib.ManifestError(f"input directory {args.input_dir!r} does not "
                                             "exist")
        if os.path.exists(args.output) and not args.overwrite:
            raise manifest_lib.ManifestError(f"{args.output} exists; pass --overwrite to "
                                             "replace it")
        types = manifest_lib.reference_task_types(
            args.task_types or manifest_lib.REFERENCE_TASK_TYPES)
        files = sorted(f for f in os.listdir(args.input_dir) if f.endswith(".parquet"))
        negatives = {f[:-len(".parquet")]: _negative_count(os.path.join(args.input_dir, f))
                     for f in files}
        manifest = manifest_lib.manifest_for_files(files, types, negatives)
    except (manifest_lib.ManifestError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.output, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    counts = {}
    for entry in manifest.values():
        counts[entry["task_type"]] = counts.get(entry["task_type"], 0) + 1
    print(f"wrote {args.output}: {len(manifest)} datasets ("
          + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + ")")
    fewer = [f"{n} ({e['num_negatives']})" for n, e in manifest.items() if "num_negatives" in e]
    if fewer:
        print(f"{len(fewer)} dataset(s) have fewer negative columns than their task type "
              f"samples and train with what they have (\"num_negatives\" written): "
              + ", ".join(fewer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
