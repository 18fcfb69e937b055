"""Encode speed, side by side: our packed encode vs sentence-transformers' encode, on the same
exported model and the same texts (the benchmark length mix), in one process.

    python tools/bench_encode.py [--model=EXPORT_DIR] [--samples=64] [--batch_size=32] \
        [--batch_tokens=16384] [--set model.hidden_size=512 ...] [--output=bench.json]

--model: a directory written by tools/export_hf.py (HF Qwen3 + sentence-transformers files).
Without it, configs/demo.py's shape (changed with --set KEY=VALUE) is trained one step from
random weights and exported, in a temporary directory. Both sides run fp32 at
--max_seq_length 1024 (the mix's longest texts), on the GPU when there is one (ours on every
local device). Prints texts/s for both, the ratio, the
padding and FLOPs each computes (a dense kernel scores every pair of a packed row) and how
far apart the two sets of embeddings are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "demo.py")

# Before JAX starts: allocate on demand, so torch in this process finds the GPU free.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def make_model(workdir: str, out_dir: str, overrides: dict, config_path: str) -> str:
    """An exported model of the training config at `config_path` (e.g. configs/demo.py),
    changed by `overrides`: one training step from random weights on that config's data,
    then tools/export_hf's export in fp32. Only its speed matters here; the export path is
    the one users run."""
    from mlembed_jax.config import load_config_file
    from mlembed_jax.export import export_checkpoint
    from mlembed_jax.train import run

    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"config file {config_path!r} not found; pass the path of a "
                                "training config such as configs/demo.py")
    config = load_config_file(config_path, {
        "train.max_steps": 1, "train.validation_every": 0, "eval.retrieval_every": 0,
        "train.log_every": 1, "mesh.num_devices": 1, "data.prefetch": 0, **overrides})
    if run(config, workdir) != 0:
        raise RuntimeError(f"training the benchmark model in {workdir} failed")
    return export_checkpoint(workdir, out_dir, dtype="fp32", overwrite=True)["out_dir"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="exported model directory (default: make one)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for the model made without --model")
    ap.add_argument("--samples", type=int, default=64, help="mix samples (9 texts each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=32, help="sentence-transformers' batch")
    ap.add_argument("--batch_tokens", type=int, default=16384, help="our tokens per pack")
    ap.add_argument("--max_seq_length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1, help="timed calls each (best counts)")
    ap.add_argument("--output", default="", help="JSON result file")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r} must be KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key] = value

    # Slow imports (jax, torch) after the arguments are known to be usable.
    import jax
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from mlembed_jax import encode
    from mlembed_jax.perf import encode_bench as eb

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model
        try:
            if not model_dir:
                model_dir = make_model(os.path.join(tmp, "run"), os.path.join(tmp, "export"),
                                          overrides, DEMO_CONFIG)
            ours = encode.load(model_dir, max_seq_length=a.max_seq_length,
                               compute_dtype="float32")
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        device = "cuda" if torch.cuda.is_available() else "cpu"
        st = SentenceTransformer(model_dir, device=device, model_kwargs={"dtype": torch.float32})
        st.max_seq_length = a.max_seq_length
        texts, _ = eb.mix_texts(ours.tokenizer, a.samples, a.seed, a.max_seq_length)
        lengths = np.asarray([len(t) for t in ours.tokenize(texts)])
        ours_t = eb.time_ours(ours, texts, a.batch_tokens, a.repeats)
        st_t = eb.time_st(st, texts, a.batch_size, a.repeats)
        diff = float(np.abs(ours_t.pop("embeddings") - st_t.pop("embeddings")).max())
        packed = eb.packed_layout(lengths, a.batch_tokens, ours.cfg)
        padded = eb.st_layout(lengths, a.batch_size, ours.cfg)
        result = {
            "model": model_dir if a.model else f"configs/demo.py {overrides or ''}".strip(),
            "shape": {k: getattr(ours.cfg, k) for k in (
                "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "vocab_size")},
            "texts": len(texts), "tokens": int(lengths.sum()),
            "ours": {**ours_t, **packed, "batch_tokens": a.batch_tokens},
            "sentence_transformers": {**st_t, **padded, "batch_size": a.batch_size},
            "ratio": ours_t["texts_per_s"] / st_t["texts_per_s"],
            "max_abs_embedding_diff": diff,
            "device": f"{jax.devices()[0].device_kind} x {len(jax.local_devices())} (jax); "
                      + (f"torch {torch.cuda.get_device_name()}" if device == "cuda" else
                         f"torch CPU, {torch.get_num_threads()} threads"),
        }
    o, s = result["ours"], result["sentence_transformers"]
    print(f"{result['texts']} texts, {result['tokens']} tokens (benchmark length mix), model "
          f"{result['shape']}, {result['device']}")
    print(f"ours (packed):          {o['texts_per_s']:8.1f} texts/s  ({o['seconds']:.2f} s; "
          f"first call with compiles {o['first_call_s']:.2f} s; padding "
          f"{100 * o['padding']:.1f}%, {o['forward_flops']:.2e} FLOPs)")
    print(f"sentence-transformers:  {s['texts_per_s']:8.1f} texts/s  ({s['seconds']:.2f} s; "
          f"batch {a.batch_size}, length-sorted; padding {100 * s['padding']:.1f}%, "
          f"{s['forward_flops']:.2e} FLOPs)")
    print(f"ratio: {result['ratio']:.2f}x; max |embedding difference| {diff:.1e}")
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
