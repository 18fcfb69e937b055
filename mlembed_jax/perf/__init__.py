"""Performance: hand-counted FLOPs and the chip table (flops), reading compiled programs
(hlo), ahead-of-time compiles for pods (aot), the timed train step (benchmark) on the
benchmark length mix (benchmark_mix), and profile traces (profile_summary)."""
