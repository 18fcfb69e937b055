"""Which attention kernels exist and where each may run. Plain Python (no JAX), so config
validation can ask before any backend starts; model/attention.py holds the kernels."""

from __future__ import annotations

import importlib.util

KERNELS = ("dense", "xla_sdpa", "cudnn", "splash", "tokamax_mosaic", "tokamax_triton",
           "tokamax_xla")

# Kernels that only compile for NVIDIA GPUs; `check_platform` turns a mismatch into one error.
GPU_ONLY = frozenset({"cudnn", "tokamax_mosaic", "tokamax_triton"})

TOKAMAX_MISSING = ("the tokamax attention kernels need the tokamax package; install it with "
                   "`pip install tokamax` or pick model.attention='cudnn'")


def check_platform(name: str, platform: str) -> None:
    """Raises ValueError, naming the fix, when kernel `name` cannot run on `platform`
    ("cpu", "gpu", "tpu") or needs a package that is missing."""
    if name not in KERNELS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of "
                         f"{sorted(KERNELS)}")
    if name in GPU_ONLY and platform != "gpu":
        raise ValueError(f"model.attention={name!r} runs on NVIDIA GPUs only, but this run's "
                         f"devices are {platform!r}; use 'dense' or 'xla_sdpa' (portable), or "
                         "'splash' on TPU")
    if name.startswith("tokamax_") and importlib.util.find_spec("tokamax") is None:
        raise ValueError(f"model.attention={name!r}: {TOKAMAX_MISSING}")
