"""The mesh and the one logical-axis rules table: how params and activations are laid out.

Model code only names logical axes (batch, embed, heads, ...). `config.mesh.logical_axis_rules`
maps them to mesh axes (data, fsdp, tensor); changing parallelism changes the config only.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlembed_jax.config import ConfigError, mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sizes from the config."""
    devices = list(devices if devices is not None else jax.devices())
    n = mesh_cfg.get("num_devices", -1)
    if n != -1:
        if not 1 <= n <= len(devices):
            raise ConfigError(f"mesh.num_devices={n} but {len(devices)} devices are present")
        devices = devices[:n]
    sizes = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh([sizes[a] for a in MESH_AXES], devices)
    except (ValueError, AssertionError, NotImplementedError):
        # Fake/CPU devices have no physical topology; a plain reshape is exact there.
        arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def rules_list(rules) -> list[tuple[str, object]]:
    """Config rules (tuples/lists from a ConfigDict) -> the list flax expects."""
    out = []
    for name, target in rules:
        out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return out


def logical_shardings(logical_specs, mesh: Mesh, rules):
    """A pytree of logical PartitionSpecs -> NamedShardings on `mesh` under `rules`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_list(rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dim over the batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """Context under which the model's logical activation constraints take effect."""
    with jax.set_mesh(mesh):
        with nn.logical_axis_rules(rules_list(rules)):
            yield
