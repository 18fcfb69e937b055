"""The paper's two stages and the released run: retrieval-only data, a run that starts from a
training checkpoint's params (MEL factors as trained, fresh optimizer and data), and MEL at a
fixed rank."""

import os

import jax
import numpy as np
import pytest
from train_helpers import ROOT, final_params, small_config, train_losses

from mlembed_jax.checkpoint.reader import init_params_from
from mlembed_jax.config import ConfigError, load_config_file
from mlembed_jax.metrics_log import read_metrics
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.recipe import TrainedPoints
from mlembed_jax.train import run

CONFIGS = os.path.join(ROOT, "configs")


def test_released_and_stage_configs():
    released = load_config_file(os.path.join(CONFIGS, "0.6b_released.py"))
    assert released.model.mel and released.model.mel_r_min == released.model.mel_r_max == 512
    points = TrainedPoints.of(EncoderConfig.from_config(released.model), 8)
    assert points.ranks == (512,)  # no rank sampling: every step at 512
    from mlembed_jax.model.factorized_embed import sample_mel_rank

    keys = jax.random.split(jax.random.key(0), 16)
    assert {int(sample_mel_rank(k, 512, 512)) for k in keys} == {512}
    one = load_config_file(os.path.join(CONFIGS, "0.6b_stage1.py"))
    two = load_config_file(os.path.join(CONFIGS, "0.6b_stage2.py"))
    assert one.data.task_types == ("retrieval",) and one.train.init_from == ""
    assert two.data.task_types == () and two.train.init_from == "runs/0.6b-stage1"
    assert one.model == two.model  # stage 2 can take stage 1's params as they are


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_reference_presets_train_64_samples_per_step_on_any_device_count(devices):
    """The released and stage presets pin the reference's step (8 per GPU x 8 GPUs = 64
    samples) whatever the device count; a device holds one pack's activations at a time.
    The mesh and the step's geometry only (build_step traces nothing, compiles nothing)."""
    from mlembed_jax.batch import geometry_from_config
    from mlembed_jax.run_summary import batch_summary
    from mlembed_jax.sharding import batch_shards, make_mesh, packs_per_step
    from mlembed_jax.train_step import build_step

    for name in ("0.6b_released.py", "0.6b_stage1.py", "0.6b_stage2.py"):
        c = load_config_file(os.path.join(CONFIGS, name), {"mesh.num_devices": devices})
        mesh = make_mesh(c.mesh)
        rules = c.mesh.logical_axis_rules
        packs, shards = packs_per_step(c.data, mesh, rules), batch_shards(mesh, rules)
        assert shards == devices
        step = build_step(c, mesh, total_steps=10,
                          geometries=geometry_from_config(c.data, packs, rows=20))
        g = step.geometry
        assert g.packs * g.samples_per_pack == 64, name
        # One pack per device per forward: 8 / devices chunks, none at 8 devices.
        chunks = step.setup.grad_cache_chunks
        assert g.packs // (shards * max(chunks, 1)) == 1
        assert chunks == (0 if devices == 8 else 8 // devices)
        line = batch_summary(c, packs, shards)
        assert line.startswith("global batch: 64 samples per step = 8 packs x 8 samples"), line
    # The plain size config: one pack per device, so the step grows with the devices.
    plain = load_config_file(os.path.join(CONFIGS, "0.6b.py"), {"mesh.num_devices": devices})
    mesh = make_mesh(plain.mesh)
    assert packs_per_step(plain.data, mesh, plain.mesh.logical_axis_rules) == devices


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("stage1"))
    cfg = small_config(**{"train.max_steps": 3, "train.checkpoint_every": 100,
                          "data.task_types": ("retrieval",), "mesh.num_devices": 1})
    assert run(cfg, work) == 0
    return work


@pytest.mark.integration
def test_stage1_trains_the_retrieval_datasets_only(stage1):
    logged = read_metrics(stage1)
    datasets = {k.split("/")[-1] for m in logged for k in m if "loss_by_dataset" in k}
    assert datasets == {"cldr_names"}  # the demo's one retrieval set of three


@pytest.mark.integration
def test_stage2_starts_from_stage1_params_with_a_fresh_optimizer(stage1, tmp_path, capsys):
    cfg = small_config(**{"train.max_steps": 2, "train.checkpoint_every": 100,
                          "train.init_from": stage1, "mesh.num_devices": 1})
    enc = EncoderConfig.from_config(cfg.model)
    host, what = init_params_from(stage1, enc, cfg)
    step, trained = final_params(stage1)
    assert step == 3 and "training checkpoint" in what and "MEL factors kept" in what
    # Bit for bit the trained params, the MEL factors U and V included (no SVD of a fold).
    flat = jax.tree_util.tree_leaves_with_path(trained)
    assert any("U" in jax.tree_util.keystr(p) for p, _ in flat)
    for (path, want), got in zip(flat, jax.tree_util.tree_leaves(host)):
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=jax.tree_util.keystr(path))
    capsys.readouterr()
    work = str(tmp_path / "stage2")
    assert run(cfg, work) == 0
    out = capsys.readouterr().out
    assert f"initialised from training checkpoint {stage1} step 3" in out
    assert "data: 3 datasets" in out  # the full mix
    # One pack of 8 on the one device (the demo's data.packs_per_step=-1).
    assert ("global batch: 8 samples per step = 1 pack x 8 samples (data.packs_per_step=-1: "
            "one pack per batch shard); 1 pack on each of 1 batch shard\n") in out
    assert final_params(work)[0] == 2  # its own step count: a fresh optimizer state
    lr = {m["step"]: m["train/lr"] for m in read_metrics(work) if "train/lr" in m}
    lr1 = {m["step"]: m["train/lr"] for m in read_metrics(stage1) if "train/lr" in m}
    assert lr[1] == lr1[1]  # the schedule starts over (warmup from its first step)
    assert sorted(train_losses(work)) == [1, 2]


@pytest.mark.integration
def test_init_from_errors(stage1, tmp_path):
    other = small_config(**{"train.max_steps": 1, "train.init_from": stage1,
                            "model.hidden_size": 96, "mesh.num_devices": 1})
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 64, config 96\)\. "
                                          r"train.init_from needs a checkpoint of the "
                                          r"configured model shape"):
        run(other, str(tmp_path / "other"))
    nothing = small_config(**{"train.max_steps": 1, "train.init_from": str(tmp_path),
                              "mesh.num_devices": 1})
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
        run(nothing, str(tmp_path / "nothing"))


def test_task_types_that_match_nothing_are_a_clear_error():
    from mlembed_jax.data import DEMO_PREPARED
    from mlembed_jax.data.parquet_io import DataError
    from mlembed_jax.data.prepared import load_prepared

    data = load_prepared(DEMO_PREPARED, 64, task_types=("clustering",))
    assert data.names == ("cldr_kinds",) and data.datasets[0].dataset_id == 0
    with pytest.raises(DataError, match=r"no dataset has a task type in data.task_types="
                                        r"\('nothing',\)"):
        load_prepared(DEMO_PREPARED, 64, task_types=("nothing",))
