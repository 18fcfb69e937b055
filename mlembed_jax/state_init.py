"""Creating the train state already sharded: abstract first, then materialised in place.

Nothing is ever built whole on one device: random init runs under jit with the state's
out_shardings, and HF weights go to devices shard by shard from the host copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax.model.encoder import init_params
from mlembed_jax.train_step import StepSetup, TrainState


def _fresh_state(setup: StepSetup, params, seed: int) -> TrainState:
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=setup.tx.init(params), rng=rng)


def abstract_state(setup: StepSetup, seed: int = 0) -> TrainState:
    """ShapeDtypeStructs of the whole state (params, optimizer moments, step, rng)."""
    return jax.eval_shape(
        lambda: _fresh_state(setup, init_params(setup.enc, jax.random.key(seed)), seed))


def init_state(setup: StepSetup, state_sh: TrainState, seed: int,
               host_params: dict | None = None) -> TrainState:
    """A sharded train state: random params (host_params None) or the given host params."""
    if host_params is None:
        make = lambda: _fresh_state(setup, init_params(setup.enc, jax.random.key(seed)), seed)
        return jax.jit(make, out_shardings=state_sh)()
    params = place_params(host_params, state_sh.params, setup.enc.param_dtype)
    return jax.jit(lambda p: _fresh_state(setup, p, seed), out_shardings=state_sh,
                   donate_argnums=0)(params)


def place_params(host_params: dict, shardings, dtype: str):
    """Host numpy params -> global arrays; each process copies only its addressable shards."""
    np_dtype = jnp.dtype(dtype)

    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx].astype(np_dtype))

    return jax.tree_util.tree_map(put, host_params, shardings)
