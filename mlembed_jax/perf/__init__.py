"""Performance: counting, compiling ahead of time, timing and profiling the train step.

Modules:
  flops            FLOPs of a step counted by hand; the one accelerator table
  hlo              reading compiled programs: memory, FLOPs, collectives, DCN crossings
  aot_target       what an AOT compile targets and the environment it needs (no JAX)
  aot              ahead-of-time compiles of the real step for pods we do not have
  gpu_target       NVIDIA GPUs described from XLA's own descriptions (no JAX)
  gpu_aot          the GPU side of an AOT compile: memory budget, what to change
  tpu_cost         the TPU compiler's own estimate of a step's time
  benchmark        times the full train step on the benchmark length mix
  benchmark_mix    length mixes as packed batches of synthetic token ids
  encode_bench     our packed encode against sentence-transformers' encode
  profile_summary  where device time goes, from a jax.profiler trace
"""
