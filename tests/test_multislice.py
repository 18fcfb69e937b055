"""Several slices joined by DCN (mesh.dcn_data): the hybrid mesh puts data parallelism across
slices and FSDP inside each, with the rules table unchanged. On the 8 fake CPU devices,
consecutive chunks of 4 devices stand in for two slices (tests/test_aot.py compiles for two
described TPU slices where libtpu is installed)."""

import jax
import numpy as np
import pytest
from train_helpers import small_config, train_losses

from mlembed_jax.config import ConfigError, base_config
from mlembed_jax.sharding import make_mesh, num_slices, pack_ranges
from mlembed_jax.train import run


def _mesh_cfg(**sizes):
    c = base_config().mesh
    for k, v in sizes.items():
        c[k] = v
    return c


def test_two_slices_put_data_across_and_fsdp_inside():
    devices = jax.devices()
    assert num_slices(devices) == 1  # CPU devices belong to no slice
    mesh = make_mesh(_mesh_cfg(data=1, fsdp=-1, dcn_data=2))
    # mesh.data/fsdp/tensor describe one slice of 4 devices: fsdp=-1 is 4, not 8.
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    # Several data rows per slice: slice-major, each slice's rows on its own devices.
    mesh = make_mesh(_mesh_cfg(data=2, fsdp=2, dcn_data=2))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sorted(ids[:2].ravel()) == [0, 1, 2, 3] and sorted(ids[2:].ravel()) == [4, 5, 6, 7]
    # Each process still builds its own packs (here one process builds all 8).
    rules = base_config().mesh.logical_axis_rules
    assert pack_ranges(mesh, rules, 8) == {0: (0, 8)}


def test_slices_that_do_not_fit_the_devices_are_config_errors():
    with pytest.raises(ConfigError, match="dcn_data=3 slices do not divide the 8 devices"):
        make_mesh(_mesh_cfg(dcn_data=3))
    with pytest.raises(ConfigError, match="describe one slice of 4 devices"):
        make_mesh(_mesh_cfg(data=1, fsdp=8, dcn_data=2))


@pytest.mark.integration
def test_two_slices_of_4_train_like_one_slice_of_8(tmp_path):
    # The same 8 packs per step in both runs; FSDP over all 8 devices against 2 slices of
    # FSDP over 4 with data parallelism across them.
    common = {"train.max_steps": 4, "data.packs_per_step": 8, "train.checkpoint_every": 100}
    one = small_config(**common, **{"mesh.data": 1, "mesh.fsdp": 8})
    two = small_config(**common, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.dcn_data": 2})
    assert run(one, str(tmp_path / "one")) == 0
    assert run(two, str(tmp_path / "two")) == 0
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # the tolerance of the 8-vs-1 device test (tests/test_train.py)
        assert abs(a[step] - b[step]) <= 1e-4, (step, a[step], b[step])
