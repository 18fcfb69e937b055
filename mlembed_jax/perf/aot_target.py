"""What an AOT compile targets, and the process environment it needs. No JAX here: this
must run before JAX starts a backend (tools/aot_compile.py calls `prepare_environment`
first, then imports perf/aot.py).

A target is a TPU topology described by libtpu (`v5p:4x4x4`, `v6e:8x8`, ...) with no TPU
attached; NVIDIA GPUs described by JAX's CUDA plugin from XLA's specs (`h100:8`, `h200:1`,
`h100:2x8` = 2 nodes of 8; perf/gpu_target.py), compiled by XLA:GPU with no GPU attached;
or N fake CPU devices (`cpu:8`, and with --gpu_planner=cpu the old XLA:CPU stand-in for a
GPU cluster).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import warnings
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from mlembed_jax.model.kernel_choice import INTERPRET_ENV
from mlembed_jax.perf import gpu_target
from mlembed_jax.perf.flops import CHIPS, CHIPS_BY_NAME


class AotError(RuntimeError):
    """A target or environment the tool cannot use; the message says what to do."""


class LibtpuMissing(AotError):
    """libtpu is not installed, so TPU topologies cannot be described here."""


class GpuPluginMissing(AotError):
    """JAX's CUDA plugin is not installed, so GPUs cannot be described here."""


CUDA_PLUGIN_MISSING = (
    "JAX's CUDA plugin is not installed, so XLA:GPU cannot compile here. Install it with "
    "`make gpu-aot` (into the venv, off the import path) or `pip install "
    "'mlembed_jax[gpu-aot]'` (jax[cuda12-local] and cuDNN; no GPU or driver needed), or use "
    "--gpu_planner=cpu for the old XLA:CPU planning figures")


def gpu_aot_dir() -> str | None:
    """The copy of the CUDA plugin and cuDNN that `make gpu-aot` puts under <venv>/gpu-aot.
    It stays off sys.path: on a machine without a GPU, an importable plugin makes every JAX
    process print CUDA driver warnings (and a plugin error without JAX_PLATFORMS=cpu)."""
    side = os.path.join(sys.prefix, "gpu-aot")
    return side if os.path.isdir(os.path.join(side, "jax_plugins", "xla_cuda12")) else None


def _plugin_importable() -> bool:
    try:  # find_spec imports the parent: no jax_plugins package at all raises
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA 12 PJRT plugin is importable or in <venv>/gpu-aot (it describes
    GPUs without one)."""
    return _plugin_importable() or gpu_aot_dir() is not None


def use_cuda_plugin() -> None:
    """Puts <venv>/gpu-aot on sys.path when the plugin is not importable already. JAX looks
    for plugins when it first makes a backend, so this must run before that."""
    if _plugin_importable():
        return
    side = gpu_aot_dir()
    if side is None:
        raise GpuPluginMissing(CUDA_PLUGIN_MISSING)
    if side not in sys.path:
        sys.path.insert(0, side)
        importlib.invalidate_caches()


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for. platform: 'tpu' (libtpu topology), 'gpu' (XLA:GPU, described
    devices) or 'cpu' (fake devices)."""

    spec: str  # as given: "v5p:4x4x4", "h100:8", "h100:2x8"
    platform: str
    chip: str  # "v5p", "h100", ...
    shape: str  # "4x4x4" (TPU), "2x8" (GPU nodes x GPUs) or the device count (CPU)
    num_devices: int  # all slices / nodes together
    hbm_bytes: float | None
    peak_flops: float | None
    num_slices: int = 1  # TPU slices joined by DCN (--num_slices)
    nodes: int = 1  # GPU nodes (the data axis goes across them)

    @property
    def indicative(self) -> bool:
        return self.platform == "cpu"


GPU_PLANNERS = ("xla_gpu", "cpu")


def parse_target(spec: str, num_slices: int = 1, gpu_planner: str = "xla_gpu") -> Target:
    """'v5p:4x4x4' -> a 64-chip TPU target; 'h100:8' -> 8 H100s compiled by XLA:GPU;
    'h100:2x8' -> 2 nodes of 8; 'cpu:8' -> 8 fake CPU devices. num_slices: that many TPU
    slices of the shape, joined by DCN (TPU only). gpu_planner='cpu': GPUs as fake CPU
    devices compiled by XLA:CPU (the planning figures of earlier releases)."""
    if num_slices < 1:
        raise AotError(f"--num_slices={num_slices} must be at least 1")
    if gpu_planner not in GPU_PLANNERS:
        raise AotError(f"--gpu_planner={gpu_planner!r}: choose one of {list(GPU_PLANNERS)}")
    if ":" not in spec:
        raise AotError(f"--topology={spec!r}: expected CHIP:SHAPE, e.g. v5p:4x4x4, v6e:8x8, "
                       "h100:8 (GPUs), h100:2x8 (nodes x GPUs) or cpu:8")
    chip, shape = spec.lower().split(":", 1)
    known = CHIPS_BY_NAME.get(chip)
    if known is not None and known.platform == "tpu":
        dims = shape.split("x")
        if not all(d.isdigit() and int(d) > 0 for d in dims):
            raise AotError(f"--topology={spec!r}: TPU shape must look like 4x4x4 or 8x8")
        n = 1
        for d in dims:
            n *= int(d)
        return Target(spec, "tpu", chip, shape, n * num_slices, known.hbm_bytes,
                      known.peak_flops, num_slices)
    if num_slices != 1:
        raise AotError(f"--num_slices is for TPU topologies; for GPU nodes give NODESxGPUS, "
                       f"e.g. --topology={chip}:2x8")
    if chip == "cpu" or (gpu_planner == "cpu" and known is not None):
        if not shape.isdigit() or int(shape) < 1:
            raise AotError(f"--topology={spec!r}: fake CPU devices take a device count, "
                           "e.g. cpu:8")
        hbm, peak = (known.hbm_bytes, known.peak_flops) if known else (None, None)
        return Target(spec, "cpu", chip, shape, int(shape), hbm, peak)
    if chip in gpu_target.GPU_SPECS:
        m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
        if not m or int(m.group(2)) < 1 or (m.group(1) is not None and int(m.group(1)) < 1):
            raise AotError(f"--topology={spec!r}: GPUs take a count (h100:8) or nodes x GPUs "
                           "per node (h100:2x8)")
        nodes, per_node = int(m.group(1) or 1), int(m.group(2))
        family = CHIPS_BY_NAME.get(chip.split("_")[0])
        return Target(spec, "gpu", chip, f"{nodes}x{per_node}", nodes * per_node,
                      float(gpu_target.load(chip).hbm_bytes),
                      family.peak_flops if family else None, nodes=nodes)
    if known is not None:  # a GPU in flops.CHIPS that XLA ships no spec for
        raise AotError(f"--topology={spec!r}: no XLA:GPU description of {chip!r}; known GPUs: "
                       f"{gpu_target.known_gpus()} (or --gpu_planner=cpu: fake CPU devices)")
    tpus = sorted(c.name for c in CHIPS if c.platform == "tpu")
    raise AotError(f"--topology={spec!r}: unknown chip {chip!r}; TPU: {tpus}; GPU (XLA:GPU): "
                   f"{gpu_target.known_gpus()}; fake CPU devices: cpu")


def find_libtpu() -> str | None:
    """Path of libtpu.so: $TPU_LIBRARY_PATH, the `libtpu` package, or the copy `make setup`
    puts under <venv>/libtpu (kept off sys.path, so ordinary CPU runs never load it)."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    try:
        import libtpu  # optional: only TPU targets need it
    except ImportError:  # not importable: look beside the venv (make libtpu puts it there)
        side = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
        return side if os.path.isfile(side) else None
    return libtpu.get_library_path()


def jax_libtpu_requirement():
    """jax's pin of libtpu in its `tpu` extra (a packaging Requirement, e.g. libtpu==0.0.42.*),
    read from the installed jax's metadata; None if it declares none."""
    for text in metadata.requires("jax") or []:
        req = Requirement(text)
        if req.name == "libtpu" and (req.marker is None or req.marker.evaluate({"extra": "tpu"})):
            return req
    return None


def libtpu_version(library_path: str | None) -> str | None:
    """The version of the libtpu distribution that holds `library_path` (its dist-info, as
    `make libtpu` installs it), else of the importable libtpu package; None if unknown."""
    if library_path:
        top = os.path.dirname(os.path.dirname(os.path.abspath(library_path)))
        for dist in metadata.distributions(path=[top]):
            if dist.metadata["Name"] == "libtpu":
                return dist.version
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def check_libtpu(library_path: str | None) -> str | None:
    """None when libtpu's version is what the installed jax pins (or cannot be told), else one
    line saying what to do: XLA:TPU's memory figures differ between libtpu releases, and a
    newer libtpu than jax's can fail on jax's programs."""
    req, have = jax_libtpu_requirement(), libtpu_version(library_path)
    if req is None or have is None or req.specifier.contains(Version(have), prereleases=True):
        return None
    jax_version = metadata.version("jax")
    return (f"libtpu {have} does not match jax {jax_version}'s pin libtpu{req.specifier}; "
            f"install the pinned one: `make libtpu`, or pip install 'jax[tpu]=={jax_version}'")


def prepare_environment(target: Target) -> None:
    """Env vars for the target; call before anything creates a JAX backend.

    Compilation never needs a local accelerator, so the local backend is always CPU (a GPU
    machine would otherwise grab its GPUs). Fake CPU devices get their count from XLA_FLAGS.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: the env var alone is read too late
        try:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
        except Exception as e:  # noqa: BLE001 - a backend exists already: say so
            warnings.warn(f"could not switch JAX to the CPU backend ({e}); the compile may "
                          "use a local accelerator")
    if target.platform == "gpu":
        use_cuda_plugin()
        # A GPU program gets the real kernels, never Pallas' CPU interpreter.
        os.environ.pop(INTERPRET_ENV, None)
        return
    if target.platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={target.num_devices}").strip()
        return
    path = find_libtpu()
    if path is None:
        raise LibtpuMissing(
            "libtpu is not installed, so TPU topologies cannot be described on this machine. "
            "Install it with `make libtpu` (into the venv, off the import path) or "
            "`pip install 'mlembed_jax[tpu]'`, or point TPU_LIBRARY_PATH at a libtpu.so.")
    os.environ["TPU_LIBRARY_PATH"] = path
    # The Pallas interpreter switch is for CPU tests; a TPU program gets the real kernels.
    os.environ.pop(INTERPRET_ENV, None)
    # Several compiles may run at once (tests, other users): libtpu otherwise takes a
    # machine-wide lock meant for real chips. No metadata server here either.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
