r"""Compile the real train step ahead of time for a TPU pod or a GPU cluster, and say if it fits.

    python tools/aot_compile.py --config=configs/8b.py --topology=v5p:4x4x4 [--num_slices=2] \
        [--config.section.field=value ...] [--max_fraction=0.9] [--hlo_out=FILE]

--topology:
  v5p:4x4x4, v5p:2x4x4, v6e:8x8, v5e:16x16, v4:4x4x4, ...   a TPU slice, described by libtpu
      on this machine (no TPU needed; `make libtpu` installs it). Memory is XLA:TPU's own.
  h100:8, h200:8, b200:8, h100_pcie:1, h100:1        NVIDIA GPUs, described by JAX's CUDA
  h100:2x8 (nodes x GPUs per node)                  plugin from XLA's specs and compiled by
      XLA:GPU on this CPU (no GPU needed; `make gpu-aot`). Memory is
      XLA:GPU's own buffer assignment, checked against the HBM a JAX process preallocates:
      XLA_PYTHON_CLIENT_MEM_FRACTION if set, else JAX's 75%. Several nodes put the data axis
      across them (mesh.dcn_data) and the report adds what crosses the node boundary.
      XLA_FLAGS apply: `source launch/xla_gpu_flags.sh` first to compile with training's.
      GEMMs are not autotuned (no speed figures), and XLA gives no cost analysis here.
  cpu:8                                             N fake CPU devices, compiled by XLA:CPU.
  --gpu_planner=cpu: GPUs as fake CPU devices compiled by XLA:CPU with dense attention (the
      planning figures of earlier releases; far above XLA:GPU's). Kept for one release.

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

On a GPU that does not fit, the RESULT line gives the numbers and what would help (remat,
cached-gradient chunks, FSDP, the memory fraction).

Exit codes: 0 fits; 1 does not fit (or XLA ran out of memory compiling); 2 bad config or
topology; 3 libtpu (TPU) or JAX's CUDA plugin (GPU) is not installed.
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
flags.DEFINE_float("max_fraction", 0.9, "TPU (and --gpu_planner=cpu): the step fits if its "
                   "per-chip total is at most this fraction of the chip's HBM (the rest: "
                   "runtime, fragmentation). GPUs use XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75")
flags.DEFINE_enum("gpu_planner", "xla_gpu", ["xla_gpu", "cpu"], "xla_gpu: compile GPU "
                  "targets with XLA:GPU; cpu: the old XLA:CPU planning on fake CPU devices")
flags.DEFINE_string("hlo_out", "", "also write the compiled HLO text here")
flags.DEFINE_bool("predict_time", True, "TPU: also print XLA:TPU's predicted step time (a "
                  "second compile, with two layers per loop iteration)")
flags.DEFINE_integer("num_datasets", 1, "datasets in the run (only sizes per-dataset metrics)")
flags.mark_flags_as_required(["topology"])


def main(argv, config):
    del argv
    try:
        target = aot_target.parse_target(FLAGS.topology, FLAGS.num_slices, FLAGS.gpu_planner)
        aot_target.prepare_environment(target)  # before JAX makes a backend
        from mlembed_jax.perf import aot, gpu_aot  # import JAX: only after the environment is set

        if target.platform == "gpu":
            gpu_aot.budgets(target.hbm_bytes)  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION: exit 2
            config = gpu_aot.node_config(config, target)
        validate(config)
        devices = aot.target_devices(target)
        built = aot.build_lowered(config, devices, FLAGS.num_datasets)
    except (aot_target.LibtpuMissing, aot_target.GpuPluginMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (aot_target.AotError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        compiled = built.lowered.compile()
    except Exception as e:  # XLA reports running out of HBM as a compile error
        if target.platform == "gpu" and "ptxas" in str(e):
            print("error: XLA:GPU needs ptxas to assemble its kernels and found none; install "
                  "it with `pip install nvidia-cuda-nvcc-cu12` (in the gpu-aot extra) or put a "
                  "CUDA toolkit's bin/ on PATH", file=sys.stderr)
            return 3
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
