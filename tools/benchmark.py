"""Benchmark the full train step on the benchmark length mix, optionally against the
PyTorch reference recipe on the same samples.

    python tools/benchmark.py --config=configs/0.6b.py [--steps=20] [--warmup=3] \
        [--baseline=torch] [--compare_plain] [--config.field=value ...]

Prints step time (median), useful tokens/s, padding, MFU on useful tokens (hand-counted
FLOPs, see mlembed_jax/perf/flops.py), peak device memory, device and versions. On CPU it is a
smoke run (tiny configs); its timings mean nothing for GPUs.
"""

from __future__ import annotations

import datetime
import os
import sys

# Before JAX starts: allocate on demand, so the reported peak is what the step uses and the
# torch baseline in this process finds the GPU free.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax
import jax
from absl import flags

from mlembed_jax.attention_choice import resolve_attention
from mlembed_jax.batch import text_lengths
from mlembed_jax.cli import run_absl_main
from mlembed_jax.config import ConfigError, apply_overrides, validate
from mlembed_jax.perf import flops as flops_lib
from mlembed_jax.perf.benchmark import make_batches, plain_variant, run_jax
from mlembed_jax.sharding import make_mesh, packs_per_step

FLAGS = flags.FLAGS


def _gb(x):
    return "n/a" if x is None else f"{x / 2**30:.1f} GB"


def _row(name, median, tok_s, padding, mfu, peak):
    mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    return (f"| {name} | {median:.3f} s | {tok_s:,.0f} | {100 * padding:.0f}% | {mfu_s} "
            f"| {_gb(peak)} |")


def main(argv, config):
    del argv
    try:
        for text in FLAGS.variant or ():
            parse_variant(text)  # bad syntax fails before anything is timed
        run(validate(config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# Fields a variant may change: none of them changes the batches the rows share.
VARIANT_FIELDS = ("model.", "loss.", "optim.", "train.grad_cache_chunks")


def parse_variant(text: str) -> dict[str, str]:
    """"model.remat=none,model.attention=cudnn" -> {"model.remat": "none", ...}."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--variant={text!r}: write field=value[,field=value...]")
        if not key.strip().startswith(VARIANT_FIELDS):
            raise ConfigError(f"--variant={text!r}: only model.*, loss.*, optim.* and "
                              "train.grad_cache_chunks may change; the batches are shared with "
                              "the main run")
        out[key.strip()] = value.strip()
    return out


def run_variant(config, text, batches, geometries, mesh):
    """One more row: the main config with the variant's fields changed (same batches)."""
    try:
        c = apply_overrides(config.copy_and_resolve_references(), parse_variant(text))
        validate(c)
        c, _ = resolve_attention(c, mesh.devices.flat)
        r = run_jax(c, batches, geometries, FLAGS.warmup, f"variant {text}")
    except ConfigError as e:
        print(f"| variant {text} | error: {' '.join(str(e).split())} | | | | |", flush=True)
        return
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: a finding, not a crash
        print(f"| variant {text} | FAILED: {type(e).__name__}: {str(e)[:300]} | | | | |",
              flush=True)
        return
    print(_row(r.name, r.median_step, r.tokens_per_s, r.padding, r.mfu(), r.peak_memory),
          flush=True)


def run(config):
    mesh = make_mesh(config.mesh)
    config, kernel = resolve_attention(config, mesh.devices.flat)
    print(f"attention: {kernel.line()}")
    packs = packs_per_step(config.data, mesh, config.mesh.logical_axis_rules)
    steps = FLAGS.steps + FLAGS.warmup
    geometries, batches = make_batches(config, steps, seed=0, packs=packs)
    device = jax.devices()[0]
    print(f"date: {datetime.date.today()}  device: {device.device_kind} x{mesh.devices.size}  "
          f"jax {jax.__version__}  flax {flax.__version__}")
    m = config.model
    print(f"model: {m.num_layers} layers, d={m.hidden_size}, attention {m.attention}, remat "
          f"{m.remat}, params {m.param_dtype}, compute {m.compute_dtype}; "
          f"batch: {packs} pack(s) x {[g.rows_per_pack for g in geometries]} rows x "
          f"{geometries[0].seq_len} (row buckets), {config.data.samples_per_pack} samples per "
          "pack (benchmark length mix)")
    print("| run | step (median) | useful tok/s | padding | MFU (useful) | peak mem |")
    print("|---|---|---|---|---|---|")
    ref = None
    if FLAGS.baseline == "torch":  # first: torch then hands its cached memory back to JAX
        from torch_reference import free_device_memory, run_reference

        ref = run_reference(config, batches, FLAGS.warmup)
        free_device_memory()
        # The same texts as our timed steps; the reference trains every weight, LoRA or not.
        useful = sum(flops_lib.train_flops(config.model, text_lengths(b), lora=False)
                     for b, _ in batches[FLAGS.warmup:])
        ref_mfu = flops_lib.mfu(useful, sum(ref["step_times"]), device.device_kind)
        print(_row(f"reference (torch {ref['torch']}, transformers {ref['transformers']})",
                   ref["median_step"], ref["tokens_per_s"], ref["padding"], ref_mfu,
                   ref["peak_memory"]), flush=True)
    ours = run_jax(config, batches, geometries, FLAGS.warmup, "mlembed_jax, 3D-ML",
                   profile_dir=FLAGS.profile_dir)
    print(_row(ours.name, ours.median_step, ours.tokens_per_s, ours.padding, ours.mfu(),
               ours.peak_memory), flush=True)
    if FLAGS.compare_plain:
        plain = run_jax(plain_variant(config), batches, geometries, FLAGS.warmup,
                        "mlembed_jax, plain contrastive")
        print(_row(plain.name, plain.median_step, plain.tokens_per_s, plain.padding,
                   plain.mfu(), plain.peak_memory), flush=True)
        print(f"3D-ML overhead over plain: "
              f"{100 * (ours.median_step / plain.median_step - 1):+.1f}% step time")
    if ref is not None:
        print(f"speed-up in useful tokens/s: {ours.tokens_per_s / ref['tokens_per_s']:.2f}x")
    for text in FLAGS.variant or ():
        run_variant(config, text, batches, geometries, mesh)
    if FLAGS.profile_dir:
        from mlembed_jax.perf.profile_summary import find_trace, format_summary, op_times

        print(f"\nprofile of 3 steps of {ours.name} ({FLAGS.profile_dir}):")
        try:
            print(format_summary(op_times(find_trace(FLAGS.profile_dir)), top=FLAGS.profile_top))
        except (FileNotFoundError, ValueError) as e:
            print(f"no op summary: {e}")


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 10, "timed steps")
    flags.DEFINE_integer("warmup", 2, "untimed steps first (compilation, autotuning)")
    flags.DEFINE_enum("baseline", None, ["torch"], "also time the PyTorch reference recipe")
    flags.DEFINE_bool("compare_plain", False, "also time plain contrastive training")
    flags.DEFINE_string("profile_dir", None, "also trace 3 steps there and print where the "
                        "device time goes (mlembed_jax/perf/profile_summary.py)")
    flags.DEFINE_integer("profile_top", 25, "ops listed in the profile summary")
    flags.DEFINE_multi_string("variant", None, "also time the config with these fields "
                              "changed, e.g. --variant=model.remat=none,model.attention=cudnn "
                              "(repeatable; same batches, no baseline)")
    run_absl_main(main)
