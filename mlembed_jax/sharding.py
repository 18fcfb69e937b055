"""The mesh, the one logical-axis rules table, and how a step's batch is laid out on it.

Model code only names logical axes (batch, embed, heads, ...). `config.mesh.logical_axis_rules`
maps them to mesh axes (data, fsdp, tensor); changing parallelism changes the config only.
The batch is no exception: its mesh axes are whatever the table maps "batch" to
(`batch_axes`), and everything below that splits a step into packs, places packs on
devices or decides which packs a process builds reads them from there.

Packs: a step's batch arrays are pack-major (mlembed_jax/batch.py), and their leading dim is
sharded over the batch axes, so whole packs sit on devices and a pack never straddles two.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlembed_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Resolves -1 in the mesh config against the device count; errors name the mismatch."""
    sizes = {ax: mesh_cfg[ax] for ax in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % fixed:
        raise ConfigError(f"mesh {sizes} does not divide the {num_devices} devices; "
                          "set mesh.data/fsdp/tensor so their product divides the device count")
    for ax, v in sizes.items():
        if v == -1:
            sizes[ax] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {sizes} uses {math.prod(sizes.values())} devices but "
                          f"{num_devices} are present; set one axis to -1 to take the rest")
    return sizes


def num_slices(devices) -> int:
    """Slices the devices belong to: distinct `slice_index` values (multi-slice TPU); 1 for
    devices without one (CPU, GPU, a single TPU slice)."""
    ids = {getattr(d, "slice_index", None) for d in devices}
    ids.discard(None)
    return max(len(ids), 1)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sizes from the config.

    With several slices (mesh.dcn_data) the data axis is slice-major: [slices x mesh.data],
    each slice a whole (mesh.data, fsdp, tensor) block laid out on its own chips, so the
    rules table is unchanged and only data-parallel traffic (the gradient reduction) crosses
    slices. Real slices come from the devices' slice_index (jax's hybrid mesh); on devices
    without one, consecutive chunks of the device list stand in for slices (GPU nodes, CPU
    tests).
    """
    devices = list(devices if devices is not None else jax.devices())
    n = mesh_cfg.get("num_devices", -1)
    if n != -1:
        if not 1 <= n <= len(devices):
            raise ConfigError(f"mesh.num_devices={n} but {len(devices)} devices are present")
        devices = devices[:n]
    real = num_slices(devices)
    dcn = mesh_cfg.get("dcn_data", -1)
    slices = real if dcn == -1 else dcn
    if real > 1 and slices != real:
        raise ConfigError(f"mesh.dcn_data={dcn} but the devices span {real} slices; set "
                          f"mesh.dcn_data=-1 (or {real})")
    if len(devices) % slices:
        raise ConfigError(f"mesh.dcn_data={slices} slices do not divide the {len(devices)} "
                          "devices")
    try:
        sizes = mesh_shape(mesh_cfg, len(devices) // slices)
    except ConfigError as e:
        if slices == 1:
            raise
        raise ConfigError(f"{e} (with {slices} slices, mesh.data/fsdp/tensor describe one "
                          f"slice of {len(devices) // slices} devices)") from None
    ici = [sizes[a] for a in MESH_AXES]
    if slices == 1:
        arr = _device_grid(ici, devices)
    elif real > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, [slices, 1, 1], devices,
                                                   allow_split_physical_axes=True)
    else:
        per = len(devices) // slices
        arr = np.concatenate([_device_grid(ici, devices[i * per:(i + 1) * per])
                              for i in range(slices)], axis=0)
    return Mesh(arr, MESH_AXES)


def _device_grid(shape: list[int], devices) -> np.ndarray:
    """`devices` arranged as `shape`, following the physical topology where there is one."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError):
        # Fake/CPU devices have no physical topology; a plain reshape is exact there.
        return np.asarray(devices).reshape(shape)


def rules_list(rules) -> list[tuple[str, object]]:
    """Config rules (tuples/lists from a ConfigDict) -> the list flax expects."""
    out = []
    for name, target in rules:
        out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return out


def logical_shardings(logical_specs, mesh: Mesh, rules):
    """A pytree of logical PartitionSpecs -> NamedShardings on `mesh` under `rules`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_list(rules))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """Context under which the model's logical activation constraints take effect."""
    with jax.set_mesh(mesh):
        with nn.logical_axis_rules(rules_list(rules)):
            yield


# ------------------------------------------------------------------------------------------
# The batch on the mesh.


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    """The mesh axes the rules table maps the logical "batch" axis to (those in `mesh`)."""
    for name, target in rules_list(rules):
        if name == "batch":
            target = target if isinstance(target, tuple) else (target,) if target else ()
            return tuple(a for a in target if a in mesh.axis_names)
    return ()


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Leading dim over the batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules) or None,
                                             *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules) -> int:
    """Number of shards of the batch axes: the default packs per step (one per shard)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def packs_per_step(data_cfg, mesh: Mesh, rules) -> int:
    """data.packs_per_step, or one pack per batch shard when it is -1; checked to divide."""
    shards = batch_shards(mesh, rules)
    packs = shards if data_cfg.packs_per_step == -1 else int(data_cfg.packs_per_step)
    if packs < 1 or packs % shards:
        raise ConfigError(f"data.packs_per_step={packs} must be a positive multiple of the "
                          f"{shards} batch shards of mesh axes {batch_axes(mesh, rules)}")
    return packs


def pack_ranges(mesh: Mesh, rules, packs: int) -> dict[int, tuple[int, int]]:
    """{process index: [start, stop)} of the step's packs each process builds and feeds.

    Every process's devices hold a set of pack positions. On CPU/GPU hosts that set is one
    contiguous run, and the process builds exactly those packs. On a TPU pod the mesh
    follows the physical torus, and a host's chips sit at positions like {0, 16, 32, 48}.
    The process then builds the contiguous packs [r*k, (r+1)*k) (r: its rank among the
    distinct position sets, in order of their first position; k: the set's size), and
    jax.make_array_from_process_local_data puts them, in order, at its positions. The step
    is the same: the loss does not depend on where a pack sits, only on what it holds.
    Processes that hold the same positions (replicas along a non-batch axis) get the same
    range. Packs cover [0, packs) exactly once.
    """
    sharding = batch_sharding(mesh, rules)
    held: dict[int, set[int]] = {}
    for device, idx in sharding.devices_indices_map((packs,)).items():
        held.setdefault(device.process_index, set()).update(range(*idx[0].indices(packs)))
    distinct = sorted({frozenset(s) for s in held.values()}, key=min)
    ranges, start = {}, 0
    for s in distinct:
        ranges[s] = (start, start + len(s))
        start += len(s)
    if start != packs:
        raise ConfigError(f"the processes' devices hold overlapping pack positions "
                          f"({ {p: sorted(s) for p, s in held.items()} }); set mesh axes so "
                          "each process's devices hold whole shards of the batch axes")
    return {p: ranges[frozenset(s)] for p, s in held.items()}


def process_pack_range(mesh: Mesh, rules, packs: int) -> tuple[int, int]:
    """[start, stop) of the packs this process builds (see `pack_ranges`)."""
    return pack_ranges(mesh, rules, packs)[jax.process_index()]


def to_global_batch(local_batch: dict, geometry, mesh: Mesh, rules) -> dict:
    """This process's packs (numpy) -> the step's global, sharded jax.Arrays.

    geometry: the *global* BatchGeometry (P = all packs of the step). Leading dims become
    P*R for token arrays and P for slot arrays, sharded over the batch axes.
    """
    sharding = batch_sharding(mesh, rules)
    return {key: jax.make_array_from_process_local_data(sharding, local_batch[key], shape)
            for key, (shape, _) in geometry.shapes().items()}
