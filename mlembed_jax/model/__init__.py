"""The Qwen3 encoder with MEL and MLL.

Modules:
  qwen3             the encoder: MEL token embedding, scanned layers, MLL exits
  encoder           functional entry points: init, logical axes, forward, truncation
  factorized_embed  MEL: the factorized token embedding at a sampled rank
  attention         attention over packed rows: the encoder's one replaceable piece
  kernel_choice     which kernels exist, where each may run, what "auto" picks (no JAX)
  kernel_check      the start-up check of a kernel on the run's own devices
  hf_names          the one table between HF Qwen3 tensor names and our param paths
  hf_import         a local HF Qwen3 directory -> our params
  safetensors_io    a memory-mapped safetensors reader, tensor by tensor
  lora              LoRA: low-rank adapters on the projections, the base frozen
"""
