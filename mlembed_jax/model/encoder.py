"""Functional entry points to the encoder: init, logical axes, forward, truncation.

Params are plain (unboxed) pytrees; their logical axis names come from `param_logical_axes`,
which the sharding rules table maps onto a mesh.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlembed_jax.model.kernel_choice import remat_for
from mlembed_jax.model.qwen3 import EncoderConfig, Qwen3Encoder


def _dummy_inputs():
    tokens = jnp.zeros((1, 4), jnp.int32)
    return tokens, jnp.ones_like(tokens), jnp.zeros_like(tokens), jnp.zeros((1, 1), jnp.int32)


def _init_module(cfg: EncoderConfig) -> Qwen3Encoder:
    """The module that creates the params. Params do not depend on the attention kernel (it
    is a plain function, not a submodule), so init traces the portable `dense` one: kernels
    with shape rules (splash: seq a multiple of 128) never see the [1, 4] dummy batch, and
    init runs on any platform."""
    return Qwen3Encoder(dataclasses.replace(cfg, attention="dense",
                                            remat=remat_for(cfg.remat, "dense")))


def init_params(cfg: EncoderConfig, rng: jax.Array):
    """Random params (the shapes of `cfg`), unboxed."""
    boxed = _init_module(cfg).init(rng, *_dummy_inputs())["params"]
    return nn.unbox(boxed)


def abstract_params(cfg: EncoderConfig):
    """ShapeDtypeStructs of the params, without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))


def param_logical_axes(cfg: EncoderConfig):
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(
        lambda r: _init_module(cfg).init(r, *_dummy_inputs())["params"], jax.random.key(0))
    return nn.get_partition_spec(boxed)


def truncate_params(params, num_layers: int):
    """Keeps the first `num_layers` stacked layers; everything else is shared as is."""
    out = dict(params)
    out["layers"] = jax.tree_util.tree_map(lambda x: x[:num_layers], params["layers"])
    return out


def encode(params, cfg: EncoderConfig, tokens, segment_ids, positions, pool_index, *,
           rank=None, num_layers: int | None = None, return_hidden: bool = False):
    """Forward pass; see Qwen3Encoder for shapes. `num_layers` runs only the first k layers
    (a truncated model: its exits are those below k, plus k)."""
    if num_layers is not None and num_layers != cfg.num_layers:
        cfg = cfg.truncated(num_layers)
        params = truncate_params(params, num_layers)
    module = Qwen3Encoder(cfg, return_hidden=return_hidden)
    return module.apply({"params": params}, tokens, segment_ids, positions, pool_index, rank)
