"""A run config's attention kernel and remat policy, resolved for its devices.

Lives outside `model/` because it reads and rewrites the run config: the model package only
knows kernels (model/kernel_choice.py) and how to check one on a device
(model/kernel_check.py). Training, the benchmark and the AOT compile (TPU, CPU and,
through perf/gpu_aot.py's compile-only check, described GPUs) all resolve through here.
"""

from __future__ import annotations

from mlembed_jax.config import ConfigError, apply_overrides
from mlembed_jax.model.kernel_check import choose_for_devices
from mlembed_jax.model.kernel_choice import Choice, Probe, remat_for


def resolve_attention(config, devices, *, check: bool = True, probe: Probe | None = None
                      ) -> tuple[object, Choice]:
    """(a copy of the run config with model.attention and model.remat resolved, Choice).

    model.attention "auto" becomes the kernel chosen for `devices` and data.seq_len; an
    explicit kernel is checked against the platform and seq_len (ConfigError naming the
    fix). model.remat "auto" becomes "attention" for flash kernels, else "full".
    check: run the start-up check on this process's first device (False: none, the devices
    are only described). probe: kernel name -> None or why not, used instead of the
    start-up check (e.g. a compile-only check for described GPUs).
    """
    m = config.model
    try:
        choice = choose_for_devices(m.attention, m, int(config.data.seq_len), devices,
                                    check=check, probe=probe)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resolved = apply_overrides(config.copy_and_resolve_references(), {
        "model.attention": choice.kernel, "model.remat": remat_for(m.remat, choice.kernel)})
    if config.is_locked:
        resolved.lock()
    return resolved, choice
