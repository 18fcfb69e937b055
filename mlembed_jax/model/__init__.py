"""The Qwen3 encoder with MEL and MLL: modules (qwen3, factorized_embed, attention), their
functional entry points (encoder), the HF name table and import (hf_names, hf_import,
safetensors_io), and which attention kernel may run where (kernel_choice)."""
