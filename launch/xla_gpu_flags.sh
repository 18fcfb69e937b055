# XLA flags for NVIDIA GPU runs. Sourced by launch/slurm_gpu.sbatch (training) and
# tools/gpu_benchmark.sh, so the benchmark measures what training runs with. They must be
# exported before Python starts: XLA_FLAGS read after `import jax` are ignored. Each is
# accepted by jaxlib (tests/test_launch.py starts JAX with them).
XLA_FLAGS_GPU=(
  # Overlap the FSDP weight all-gathers and gradient reduce-scatters with the layer compute.
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  # Fewer, larger collectives: one per layer's weights instead of one per matrix.
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${XLA_FLAGS_GPU[*]}"
