"""Which attention kernels exist, where each may run, which sequence lengths each serves, and
what model.attention="auto" picks. Plain Python (no JAX), so config validation can ask
before any backend starts; model/attention.py holds the kernels and model/kernel_check.py
the start-up check that runs them on the run's devices.

"auto" walks the platform's candidates, fastest first, and takes the first that can serve
the run's seq_len and passes its start-up check (the kernel against `dense` on the run's own
head shapes, dtype and seq_len, outputs and gradients). Every candidate it passes over is
printed with the reason, and `dense` ends every list, so a run always starts, never
silently slow:
  TPU:  splash (seq_len a multiple of 128), dense
  GPU:  tokamax_mosaic (tokamax installed, Hopper or newer), cudnn, dense
  CPU:  dense_blocks (seq_len > DENSE_BLOCK), dense
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable

KERNELS = ("dense", "dense_blocks", "xla_sdpa", "cudnn", "splash", "tokamax_mosaic",
           "tokamax_triton", "tokamax_xla")
AUTO = "auto"

# Kernels that only compile for NVIDIA GPUs; `check_platform` turns a mismatch into one error.
GPU_ONLY = frozenset({"cudnn", "tokamax_mosaic", "tokamax_triton"})
# Pallas TPU kernels: TPU only, or Pallas' interpreter on CPU when INTERPRET_ENV is set.
TPU_ONLY = frozenset({"splash"})
# Flash kernels keep O(seq) residuals (q, k, v, output, softmax statistics), not the
# [seq, seq] probabilities, so model.remat="auto" keeps them (policy "attention").
FLASH = frozenset({"splash", "cudnn", "tokamax_mosaic", "tokamax_triton"})

# Testing only: "1" runs Pallas TPU kernels (splash) in Pallas' interpreter on CPU, so CPU
# tests can train with them. Never set it for a real run: the interpreter is very slow.
INTERPRET_ENV = "MLEMBED_PALLAS_INTERPRET"

TOKAMAX_MISSING = ("the tokamax attention kernels need the tokamax package; install it with "
                   "`pip install tokamax` or pick model.attention='cudnn'")

# Splash's block sizes: block_kv(_compute), block_q_dkv, block_q_dq and block_kv_dq must be
# multiples of 128 lanes and every block must divide seq_len (checked by the kernel at trace
# time), so a seq_len splash serves is a multiple of 128.
SPLASH_LANES = 128
SPLASH_BLOCK = 512  # the largest block tried: big enough to amortise, small enough for VMEM


# dense_blocks' query block. Blocks of 128 beat 256 on CPU (README "Performance" has
# tools/bench_attention.py's figures against dense).
DENSE_BLOCK = 128


def pallas_interpret() -> bool:
    """Whether INTERPRET_ENV asks for Pallas' interpreter (CPU tests only)."""
    return os.environ.get(INTERPRET_ENV, "") == "1"


def splash_block(seq_len: int, target: int = SPLASH_BLOCK) -> int:
    """The block size splash uses for rows of `seq_len`: the largest multiple of 128 that is
    at most `target` and divides seq_len (1024 -> 512, 768 -> 384, 640 -> 128). Raises
    ValueError, naming the fix, for a seq_len that is not a multiple of 128."""
    if seq_len < SPLASH_LANES or seq_len % SPLASH_LANES:
        up = -(-max(seq_len, 1) // SPLASH_LANES) * SPLASH_LANES
        raise ValueError(f"splash attention needs rows whose length is a multiple of "
                         f"{SPLASH_LANES}, got {seq_len}; set data.seq_len to e.g. {up}, or "
                         "pick another model.attention")
    top = max(SPLASH_LANES, min(target, seq_len) // SPLASH_LANES * SPLASH_LANES)
    return next(b for b in range(top, 0, -SPLASH_LANES) if seq_len % b == 0)


def seq_len_problem(name: str, seq_len: int) -> str | None:
    """Why kernel `name` cannot serve packed rows of `seq_len` tokens, or None if it can."""
    if name == "splash":
        try:
            splash_block(seq_len)
        except ValueError as e:
            return str(e)
    if name == "dense_blocks" and seq_len <= DENSE_BLOCK:
        return (f"rows of {seq_len} tokens are one block of {DENSE_BLOCK}: nothing to skip; "
                "use 'dense'")
    return None


def serves(name: str, seq_len: int) -> bool:
    return seq_len_problem(name, seq_len) is None


def check_platform(name: str, platform: str) -> None:
    """Raises ValueError, naming the fix, when kernel `name` cannot run on `platform`
    ("cpu", "gpu", "tpu") or needs a package that is missing. "auto" runs everywhere."""
    if name == AUTO:
        return
    if name not in KERNELS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of "
                         f"{sorted(KERNELS + (AUTO,))}")
    if name in GPU_ONLY and platform != "gpu":
        raise ValueError(f"model.attention={name!r} runs on NVIDIA GPUs only, but this run's "
                         f"devices are {platform!r}; use 'auto', 'dense' or 'xla_sdpa' "
                         "(portable), or 'splash' on TPU")
    if name in TPU_ONLY and platform != "tpu" and not (platform == "cpu" and pallas_interpret()):
        raise ValueError(f"model.attention={name!r} runs on TPUs only, but this run's devices "
                         f"are {platform!r}; use 'auto' or 'dense' (tests may set "
                         f"{INTERPRET_ENV}=1 to run it in Pallas' interpreter on CPU)")
    if name.startswith("tokamax_") and importlib.util.find_spec("tokamax") is None:
        raise ValueError(f"model.attention={name!r}: {TOKAMAX_MISSING}")


def remat_for(remat: str, kernel: str) -> str:
    """model.remat with "auto" resolved for `kernel`: "attention" (keep the kernel's
    residuals, never rerun its forward) for the flash kernels, "full" otherwise. "auto"
    stays "auto" while the kernel itself is still "auto"."""
    if remat != AUTO or kernel == AUTO:
        return remat
    return "attention" if kernel in FLASH else "full"


def auto_candidates(platform: str, compute_capability: str | None = None,
                    ) -> list[tuple[str, str]]:
    """[(kernel, why it is a candidate)] for model.attention="auto", fastest first; always
    ends with dense."""
    out = []
    if platform == "tpu":
        out.append(("splash", "the TPU Pallas splash kernel"))
    elif platform == "gpu":
        hopper = _major(compute_capability) >= 9
        if hopper and importlib.util.find_spec("tokamax") is not None:
            out.append(("tokamax_mosaic", "tokamax's Pallas Mosaic GPU flash kernel "
                                          "(Hopper or newer)"))
        out.append(("cudnn", "cuDNN's fused flash kernel"))
    else:
        out.append(("dense_blocks", "dense with the causal upper half skipped"))
    out.append(("dense", f"the portable XLA reference on {platform}"))
    return out


def _major(capability: str | None) -> int:
    try:
        return int(str(capability).split(".")[0])
    except ValueError:
        return 0


@dataclasses.dataclass(frozen=True)
class Choice:
    """The kernel a run uses, and why."""

    kernel: str
    requested: str
    reason: str
    passed_over: tuple[tuple[str, str], ...] = ()  # (kernel, why not) for "auto"

    def line(self) -> str:
        """One line for the run's log."""
        how = "asked for" if self.requested != AUTO else "auto"
        text = f"{self.kernel} ({how}: {self.reason})"
        for name, why in self.passed_over:
            text += f"; passed over {name}: {why}"
        return text


# probe(kernel) -> None if the kernel matched dense on the run's devices, else the reason.
Probe = Callable[[str], "str | None"]


def choose(requested: str, platform: str, seq_len: int, *,
           compute_capability: str | None = None, probe: Probe | None = None) -> Choice:
    """The kernel for a run on `platform` with packed rows of `seq_len` tokens.

    An explicit kernel is checked (platform, package, seq_len; ValueError naming the fix)
    and used as asked. "auto" takes the first candidate (`auto_candidates`) that serves
    seq_len and passes `probe`; probe None means no device to check on (an AOT compile), and
    the reason says so. dense needs no check: it is the reference the others are checked
    against.
    """
    if requested != AUTO:
        check_platform(requested, platform)
        problem = seq_len_problem(requested, seq_len)
        if problem:
            raise ValueError(f"model.attention={requested!r}: {problem}")
        return Choice(requested, requested, "model.attention")
    passed_over = []
    for name, why in auto_candidates(platform, compute_capability):
        if name == "dense":
            return Choice(name, AUTO, f"{why}, the fastest kernel that can serve this run"
                          if passed_over else why, tuple(passed_over))
        problem = seq_len_problem(name, seq_len)
        if problem is None:
            try:
                check_platform(name, platform)
            except ValueError as e:
                problem = str(e)
        if problem is None and probe is not None:
            failed = probe(name)
            if failed:
                problem = f"FAILED its start-up check against dense: {failed}"
        if problem:
            passed_over.append((name, problem))
            continue
        checked = ("matched dense on this run's devices" if probe is not None else
                   "not checked on a device: compile only")
        return Choice(name, AUTO, f"{why}; {checked}", tuple(passed_over))
    raise AssertionError("auto_candidates ends with dense")
