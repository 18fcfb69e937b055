r"""Compile the real train step ahead of time for a TPU pod or a GPU cluster, and say if it fits.

    python tools/aot_compile.py --config=configs/8b.py --topology=v5p:4x4x4 [--num_slices=2] \
        [--config.section.field=value ...] [--max_fraction=0.9] [--hlo_out=FILE]

--topology:
  v5p:4x4x4, v5p:2x4x4, v6e:8x8, v5e:16x16, v4:4x4x4, ...   a TPU slice, described by libtpu
      on this machine (no TPU needed; `make libtpu` installs it). Memory is XLA:TPU's own.
  h100:8, h100:32, h200:8, a100:16, cpu:8                    GPU-cluster planning: the same
      mesh over N fake CPU devices, compiled by XLA:CPU. Memory figures are only indicative.

--num_slices=N: N such TPU slices joined by the data-center network (DCN), described by
  libtpu as one multi-slice system; the mesh puts data parallelism across them
  (mesh.dcn_data) and the report adds the collectives that cross DCN.

Builds the step exactly as `python -m mlembed_jax.train` would for that many devices (mesh,
rules table, attention kernel, batch geometry, optimizer and 3D-ML loss from the config),
with no weights and no data, compiles it, and prints per-chip argument/temp/total bytes
against the chip's HBM, FLOPs per step (counted by hand; XLA's cost analysis counts a scanned
body once), and the collectives in the compiled HLO. For TPU targets it also prints XLA:TPU's
predicted step time with every layer counted (perf/tpu_cost.py: a roofline-type lower bound,
not a measurement; two extra compiles, off with --predict_time=false), and from it useful
tokens/s and MFU; no GPU compiler offers such an estimate without a device. A libtpu other
than the one the installed jax pins is named in a WARNING line (its memory figures differ).

Exit codes: 0 fits; 1 does not fit (or XLA ran out of memory compiling); 2 bad config or
topology; 3 libtpu is not installed.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from mlembed_jax.cli import run_absl_main
from mlembed_jax.config import ConfigError, validate
from mlembed_jax.perf import aot_target

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "v5p:4x4x4, v6e:8x8, ... or h100:8 for GPU planning")
flags.DEFINE_integer("num_slices", 1, "TPU slices of --topology joined by DCN")
flags.DEFINE_float("max_fraction", 0.9, "the step fits if its per-chip total is at most this "
                   "fraction of the chip's HBM (the rest: runtime, fragmentation)")
flags.DEFINE_string("hlo_out", "", "also write the compiled HLO text here")
flags.DEFINE_bool("predict_time", True, "TPU: also print XLA:TPU's predicted step time (a "
                  "second compile, with two layers per loop iteration)")
flags.DEFINE_integer("num_datasets", 1, "datasets in the run (only sizes per-dataset metrics)")
flags.mark_flags_as_required(["topology"])


def main(argv, config):
    del argv
    try:
        target = aot_target.parse_target(FLAGS.topology, FLAGS.num_slices)
        aot_target.prepare_environment(target)  # before JAX makes a backend
        from mlembed_jax.perf import aot  # imports JAX: only after the environment is set

        validate(config)
        devices = aot.target_devices(target)
        built = aot.build_lowered(config, devices, FLAGS.num_datasets)
    except aot_target.LibtpuMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (aot_target.AotError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        compiled = built.lowered.compile()
    except Exception as e:  # XLA reports running out of HBM as a compile error
        if aot.is_out_of_memory(e):
            print(f"RESULT: does NOT fit on {target.spec}: XLA ran out of memory compiling the "
                  f"step:\n{str(e)[:2000]}")
            return 1
        raise
    compile_s = time.time() - t0
    text, text_error = aot.compiled_text(compiled)
    if FLAGS.hlo_out and text is not None:
        with open(FLAGS.hlo_out, "w") as f:
            f.write(text)
    prediction = None
    if target.platform == "tpu" and FLAGS.predict_time:
        from mlembed_jax.perf import tpu_cost

        prediction = tpu_cost.predict(config, devices, compiled, FLAGS.num_datasets,
                                      hlo_text=text)
    fits = aot.report(built, compiled, target, compile_s, FLAGS.max_fraction, hlo_text=text,
                      hlo_error=text_error, prediction=prediction)
    return 0 if fits else 1


if __name__ == "__main__":
    run_absl_main(lambda argv, config: sys.exit(main(argv, config)))
