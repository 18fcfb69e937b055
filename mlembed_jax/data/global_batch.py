"""From this process's packs to the step's global, sharded jax.Arrays.

Every batch array's leading dim is pack-major (batch.py), so sharding the leading dim over
the mesh's batch axes puts whole packs on devices. A process supplies exactly the packs its
devices hold: `process_pack_range` finds them from the mesh, and
`jax.make_array_from_process_local_data` assembles the global arrays.
"""

from __future__ import annotations

DEFAULT_BATCH_AXES = ("data", "fsdp")


def _sharding(mesh, batch_axes):
    import jax

    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None)), axes


def batch_shards(mesh, batch_axes=DEFAULT_BATCH_AXES) -> int:
    """Number of shards of the batch axes: the default packs per step (one per shard)."""
    _, axes = _sharding(mesh, batch_axes)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def packs_per_step(data_cfg, mesh, batch_axes=DEFAULT_BATCH_AXES) -> int:
    """data.packs_per_step, or one pack per batch shard when it is -1; checked to divide."""
    shards = batch_shards(mesh, batch_axes)
    packs = shards if data_cfg.packs_per_step == -1 else int(data_cfg.packs_per_step)
    if packs < 1 or packs % shards:
        raise ValueError(f"data.packs_per_step={packs} must be a positive multiple of the "
                         f"{shards} batch shards of mesh axes {batch_axes}")
    return packs


def process_pack_range(mesh, packs: int, batch_axes=DEFAULT_BATCH_AXES) -> tuple[int, int]:
    """[start, stop) of the packs whose data lives on this process's devices."""
    sharding, _ = _sharding(mesh, batch_axes)
    idx = sharding.addressable_devices_indices_map((packs,))
    covered = set()
    for sl in idx.values():
        s = sl[0]
        covered.update(range(*s.indices(packs)))
    start, stop = min(covered), max(covered) + 1
    if len(covered) != stop - start:
        raise ValueError("this process's devices hold a non-contiguous set of packs "
                         f"{sorted(covered)}; order the mesh so each process's devices are "
                         "contiguous along the batch axes")
    return start, stop


def to_global_batch(local_batch: dict, geometry, mesh, batch_axes=DEFAULT_BATCH_AXES) -> dict:
    """Process-local numpy batch (its packs) -> dict of global jax.Arrays.

    geometry: the *global* BatchGeometry (P = all packs of the step). Leading dims become
    P*R for token arrays and P for slot arrays, sharded over `batch_axes`.
    """
    import jax

    sharding, _ = _sharding(mesh, batch_axes)
    out = {}
    for key, (shape, _) in geometry.shapes().items():
        arr = local_batch[key]
        out[key] = jax.make_array_from_process_local_data(sharding, arr, shape)
    return out
