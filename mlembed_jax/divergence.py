"""When a run has diverged: the global parameter norm against the median of its recent
readings (train.divergence_factor, train.divergence_window).

The norm, not the loss: per-batch losses differ several-fold between datasets in a healthy
run, while the norm moves smoothly, and it catches what the NaN guard cannot (weights growing
huge while the loss stays finite and the clipped gradient norm reads 0).
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import optax


@jax.jit
def param_norm(params):
    """The global L2 norm of a params tree: a scalar on device (read at log steps)."""
    return optax.tree_utils.tree_norm(params)


class DivergenceRule:
    """A parameter norm more than train.divergence_factor above the median of the last
    train.divergence_window readings (or not finite) is divergence. The median over a
    window, not the last reading, so one spike does not become the reference."""

    def __init__(self, train_cfg, start_norm: float):
        self.factor = float(train_cfg.divergence_factor)
        self.window = collections.deque([start_norm], maxlen=int(train_cfg.divergence_window))

    def __call__(self, norm: float) -> str | None:
        """None if `norm` is in line, else why it is not; a norm in line joins the window."""
        ref = float(np.median(self.window))
        if not np.isfinite(norm):
            return f"the parameter norm is {norm} (train.divergence_factor)"
        if self.factor > 0 and np.isfinite(ref) and norm > self.factor * ref:
            return (f"the run diverged: the parameter norm {norm:.4g} is {norm / ref:.3g} times "
                    f"the median of its last {len(self.window)} readings ({ref:.4g}; "
                    f"train.divergence_factor={self.factor:g})")
        self.window.append(norm)
        return None
