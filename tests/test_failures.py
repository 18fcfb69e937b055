"""Failure behaviour with real faults: NaN steps, damaged checkpoints, kill -9 during a save, a
full disk, read-only directories, a checkpoint from before fingerprints. Each test asserts
what survives: the last good step resumes, and exported weights are finite and equal to
that step's."""

from __future__ import annotations

import os
import subprocess
import time

import jax
import numpy as np
import pytest
from fault_helpers import (
    copy_run,
    read_only_dir,
    save_old_format,
    state_data_files,
    truncate,
    with_file_size_limit,
    write_random_bytes,
)
from tool_helpers import load_tool
from train_helpers import cli_args, final_params, small_config, subprocess_env, train_losses

from mlembed_jax.checkpoint.manager import Checkpointer, DataStateBox
from mlembed_jax.checkpoint.reader import (
    CheckpointDamaged,
    TrainedParams,
    load_trained,
    read_integrity,
)
from mlembed_jax.checkpoint.verify import device_fingerprint
from mlembed_jax.config import ConfigError
from mlembed_jax.metrics_log import read_metrics
from mlembed_jax.train import run

pytestmark = pytest.mark.integration  # trains, kills and resumes runs


def _export_fp32(checkpoint: str, out: str) -> dict:
    """Exports at full size in fp32; returns {HF name: array}."""
    from safetensors.numpy import load_file

    from mlembed_jax.export import export_checkpoint

    export_checkpoint(checkpoint, out, dtype="fp32")
    return load_file(os.path.join(out, "model.safetensors"))


def _assert_export_matches(tensors: dict, params: dict) -> None:
    """Every exported weight finite; the norms, an MLP weight and the folded MEL embedding
    equal the checkpoint's params (HF Linear weights are [out, in], ours [in, out])."""
    for name, x in tensors.items():
        assert np.isfinite(x).all(), name
    np.testing.assert_array_equal(tensors["norm.weight"], params["norm"]["scale"])
    np.testing.assert_array_equal(tensors["layers.1.mlp.up_proj.weight"],
                                  np.asarray(params["layers"]["mlp"]["up_proj"][1]).T)
    emb = params["embed_tokens"]
    np.testing.assert_allclose(tensors["embed_tokens.weight"],
                               np.asarray(emb["U"]) @ np.asarray(emb["V"]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ NaN steps

NAN_STEPS = (3, 5, 7, 8, 9)


def test_nan_steps_are_skipped_exactly_and_a_streak_stops_the_run(tmp_path, capsys):
    """Steps 3, 5 and 7-9 get a NaN loss inside the jitted step (train.debug_nan_steps), so
    the NaN flows through the backward pass as a real one would. The run must equal one that
    never executed those steps: the oracle below calls the same step on every other batch
    and, on those, only advances the step counter (their batch is consumed). The oracle also
    starts the run: its step-2 state is saved in the layout checkpoints had before
    fingerprints, which the run must resume from. Three NaN steps in a row exceed
    train.max_nonfinite_steps=2: the run stops at step 9 with exit 1, without saving."""
    from mlembed_jax.data.pipeline import make_train_iterator
    from mlembed_jax.sharding import make_mesh, packs_per_step, to_global_batch
    from mlembed_jax.train_step import build_step

    cfg = small_config(**{"train.max_steps": 10, "train.checkpoint_every": 2,
                          "train.keep_checkpoints": 5, "mesh.num_devices": 1,
                          "train.debug_nan_steps": NAN_STEPS, "train.max_nonfinite_steps": 2})
    work = str(tmp_path / "run")
    mesh = make_mesh(cfg.mesh)
    it = make_train_iterator(cfg, packs_per_step(cfg.data, mesh, cfg.mesh.logical_axis_rules))
    fns = build_step(cfg, mesh, total_steps=10, num_datasets=3, geometries=it.global_geometry)
    state = fns.init_state()
    with fns.rules_context():
        for step in range(1, 9):
            batch, _ = next(it)
            if step in NAN_STEPS:
                state = state.replace(step=state.step + 1)
            else:
                gb = to_global_batch(batch, fns.geometry, mesh, fns.rules)
                state, _ = fns.train(state, gb, None)
            if step == 2:
                save_old_format(work, 2, state, it.get_state(), cfg)
    oracle = jax.device_get(state)
    expected = device_fingerprint(state)
    it.close()

    assert run(cfg, work) == 1
    out, err = capsys.readouterr()
    assert f"resumed from {work}/checkpoints/2" in out
    assert "note: checkpoint 2 has no fingerprints" in out
    assert "error: step 9: 3 steps in a row had a NaN/inf loss" in err
    # Steps 7-9 were all NaN: no finite loss was ever computed with the params of checkpoints
    # 6 and 8 (8 = 6 plus two skipped steps), so both are set aside as never shown sound and
    # a rerun resumes from 4 (step 6 had a finite loss with 4's params).
    assert Checkpointer(work).steps() == [2, 4]
    unsound = {int(n.split("-")[0]): f"{work}/unsound_checkpoints/{n}"
               for n in os.listdir(f"{work}/unsound_checkpoints")}
    assert sorted(unsound) == [6, 8]
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert err.count("was never shown sound") == 2 and \
        f"Newest checkpoint on disk: step 4 ({work}/checkpoints/4)" in err, err

    # Step 8's checkpoint, set aside, holds bit for bit the oracle's state: every param, both
    # Adam moments, Adam's count (not advanced by skipped steps), the step and the RNG.
    assert read_integrity(unsound[8]).tensors == expected
    kept = copy_run(unsound[8], str(tmp_path / "kept" / "checkpoints" / "8"))
    step, params = final_params(os.path.dirname(os.path.dirname(kept)))
    assert step == 8
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(oracle.params)):
        np.testing.assert_array_equal(a, b)

    rows = {m["step"]: m for m in read_metrics(work) if "train/nonfinite_steps" in m}
    assert sorted(rows) == list(range(3, 10))
    assert [s for s in rows if rows[s]["train/nonfinite_steps"] == 1] == [3, 5, 7, 8, 9]
    assert rows[9]["train/nonfinite_total"] == 5
    assert rows[3]["train/total"] is None and rows[4]["train/total"] is not None

    _assert_export_matches(_export_fp32(kept, str(tmp_path / "export")), oracle.params)
    # The old-layout checkpoint itself still loads, saying it cannot be verified.
    TrainedParams(f"{work}/checkpoints/2")
    assert "no fingerprints" in capsys.readouterr().err


# ---------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run of 6 steps with checkpoints 2, 4, 6 (never modified: tests copy it)."""
    work = str(tmp_path_factory.mktemp("trained") / "run")
    cfg = small_config(**{"train.max_steps": 6, "train.checkpoint_every": 2,
                          "mesh.num_devices": 1})
    assert run(cfg, work) == 0
    return work, cfg


DAMAGES = {
    "random_bytes": lambda d: [write_random_bytes(f, i) for i, f in
                               enumerate(state_data_files(d))],
    "truncated": lambda d: [truncate(f) for f in state_data_files(d)],
    "missing_data_json": lambda d: os.remove(f"{d}/data/process_0-of-1.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_tools_refuse_a_damaged_checkpoint_and_name_the_intact_ones(trained_run, tmp_path,
                                                                    damage, capsys):
    from mlembed_jax import encode
    from mlembed_jax.batch import geometry_from_config
    from mlembed_jax.export import export_checkpoint
    from mlembed_jax.sharding import make_mesh
    from mlembed_jax.train_step import build_step

    eval_retrieval = load_tool("eval_retrieval")

    src, cfg = trained_run
    work = copy_run(src, str(tmp_path / "run"))
    DAMAGES[damage](f"{work}/checkpoints/6")
    named = (f"checkpoint {work}/checkpoints/6 (step 6) is damaged: ",
             f"intact earlier checkpoints: {work}/checkpoints/4, {work}/checkpoints/2")
    # A step missing only its data file still has verified params: the tools take it
    # (tests/test_tool_refusals.py); training's restore below does not.
    if damage != "missing_data_json":
        with pytest.raises(CheckpointDamaged) as e:
            export_checkpoint(work, str(tmp_path / "export"))
        assert all(s in str(e.value) for s in named), e.value
        assert not os.path.exists(tmp_path / "export")
        with pytest.raises(CheckpointDamaged) as e:
            encode.load(work)
        assert all(s in str(e.value) for s in named), e.value
        capsys.readouterr()
        assert eval_retrieval.main(["--model", work, "--heldout", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: checkpoint ") and "\n" not in err, err

    # Training's restore falls back to step 4 and sets step 6 aside.
    # The state's shapes do not depend on the batch: any row bucket will do here.
    fns = build_step(cfg, make_mesh(cfg.mesh), total_steps=6, num_datasets=3,
                     geometries=geometry_from_config(cfg.data, 1, rows=8))
    said = []
    step, state, _, integrity = Checkpointer(work).restore_latest(
        fns.abstract_state, cfg, DataStateBox, said.append)
    assert step == 4 and integrity is not None
    assert len(said) == 1 and said[0].startswith("warning: checkpoint 6 is damaged ("), said
    assert os.listdir(f"{work}/damaged_checkpoints")[0].startswith("6-")
    assert Checkpointer(work).steps() == [2, 4]
    # What survives: step 4, exported with finite weights equal to its params.
    _, params4, _ = load_trained(f"{work}/checkpoints/4")
    for a, b in zip(jax.tree_util.tree_leaves(params4),
                    jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    _assert_export_matches(_export_fp32(work, str(tmp_path / "export4")), params4)


def test_train_resumes_from_the_newest_intact_checkpoint(trained_run, tmp_path, capsys):
    """Random bytes in every state file of the newest checkpoint: training says so, resumes
    from the one before and replays the steps after it exactly (same losses as the original
    run), and metrics.jsonl keeps one row per step."""
    src, cfg = trained_run
    work = copy_run(src, str(tmp_path / "run"))
    before = train_losses(work)
    DAMAGES["random_bytes"](f"{work}/checkpoints/6")
    assert run(cfg, work) == 0
    out = capsys.readouterr().out
    assert "warning: checkpoint 6 is damaged" in out and f"resumed from {work}/checkpoints/4" \
        in out, out
    after = train_losses(work)
    assert after == before  # steps 5 and 6 replayed bit for bit, each logged once
    steps = [m["step"] for m in read_metrics(work) if "train/total" in m]
    assert steps == sorted(set(steps)) == list(range(1, 7))
    _, params6, _ = load_trained(work)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params6))


def test_resume_with_a_changed_lr_needs_the_override(trained_run, tmp_path):
    src, cfg = trained_run
    work = copy_run(src, str(tmp_path / "run"))
    changed = small_config(**{"train.max_steps": 6, "train.checkpoint_every": 2,
                              "mesh.num_devices": 1, "optim.lr": 2e-3})
    with pytest.raises(ConfigError, match=r"optim.lr 0.001 -> 0.002\. optim.lr changes what the "
                                          r"run trains; pass --allow_config_change"):
        run(changed, work)


# ------------------------------------------------ kill -9 mid-save, full disk, one row a step

def test_kill_during_save_then_full_disk_then_resume(tmp_path):
    """kill -9 while an async save is in flight; a rerun under a file-size limit (the
    full-disk fault) fails its first save, stops with one error line, removes the partial
    save and keeps the previous checkpoints, even with keep_checkpoints=1; a plain rerun then
    resumes from that checkpoint, replays the killed run's steps exactly and logs one row
    per step."""
    work = tmp_path / "run"
    ckpts = work / "checkpoints"
    kw = {"train.max_steps": 24, "train.checkpoint_every": 1, "train.keep_checkpoints": 1,
          "mesh.num_devices": 1}
    env = subprocess_env()
    killed = subprocess.Popen(cli_args(work, **kw), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline, in_flight = time.time() + 240, False
    while time.time() < deadline and not in_flight:
        assert killed.poll() is None, killed.stderr.read()[-2000:]
        in_flight = ckpts.is_dir() and any(".orbax-checkpoint-tmp" in n
                                           for n in os.listdir(ckpts)) \
            and max(train_losses(work), default=0) >= 4
        time.sleep(0.002)
    killed.kill()
    killed.wait(timeout=60)
    assert in_flight, "the kill must land during a save for this test to mean anything"
    logged = train_losses(work)
    newest = max(int(n) for n in os.listdir(ckpts) if n.isdigit())

    full = subprocess.run(with_file_size_limit(cli_args(work, **kw), 256 * 1024), env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: saving checkpoint {newest + 1} "
                                                     "failed: "), full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr
    # No temp dir; the newest and, beside it, the newest one shown sound (a finite loss
    # after it) kept, though keep_checkpoints=1.
    assert sorted(os.listdir(ckpts), key=int) == [str(newest - 1), str(newest)]
    stopped = max(train_losses(work))
    assert stopped <= newest + 2, "a failed save is reported at the latest one step later"

    resumed = subprocess.run(cli_args(work, **kw), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts}/{newest}" in resumed.stdout
    rows = [m["step"] for m in read_metrics(str(work)) if "train/total" in m]
    assert rows == list(range(1, 25))
    final = train_losses(work)
    assert all(final[s] == logged[s] for s in logged), "replayed steps must match the killed run"
    assert sorted(os.listdir(ckpts)) == ["23", "24"]  # 24 itself not yet shown sound
    _, params, _ = load_trained(str(work))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------- unwritable directories

def test_read_only_workdir_and_outputs_are_one_line_errors(trained_run, tmp_path, capsys):
    from mlembed_jax import encode

    export_hf = load_tool("export_hf")
    prepare_data = load_tool("prepare_data")

    src, cfg = trained_run
    with read_only_dir(str(tmp_path / "ro")) as ro:
        with pytest.raises(ConfigError, match=r"--workdir '.*ro/w' is not writable"):
            run(cfg, f"{ro}/w")
        texts = tmp_path / "texts.txt"
        texts.write_text("hello\n")
        capsys.readouterr()
        for tool in (
            lambda: export_hf.main(["--checkpoint", src, "--out", f"{ro}/export"]),
            lambda: encode.main(["--model", src, "--input", str(texts), "--output",
                                 f"{ro}/e.npy"]),
            lambda: prepare_data.main(["--input_dir", str(tmp_path), "--manifest", "m.json",
                                       "--tokenizer", "t", "--output_dir", f"{ro}/prepared"]),
        ):
            code = tool()
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
            assert "ro" in err[0] and ("writ" in err[0] or "ermission" in err[0]), err
