"""Training end to end: sharded equivalence, exact resume after SIGTERM, mesh changes,
config errors, and the demo's validation loss falling."""

import subprocess
import time

import pytest
from train_helpers import (
    cli_args,
    run_cli,
    sigterm_then_resume_matches,
    small_config,
    subprocess_env,
    train_losses,
)

from mlembed_jax.config import ConfigError
from mlembed_jax.metrics_log import read_metrics
from mlembed_jax.train import run

pytestmark = pytest.mark.integration  # trains


def test_8_device_mesh_matches_1_device(tmp_path):
    # 4 packs per step in both runs, so the global batches are the same.
    common = {"train.max_steps": 5, "data.packs_per_step": 4, "train.checkpoint_every": 100}
    one = small_config(**common, **{"mesh.num_devices": 1})
    eight = small_config(**common, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    assert run(one, str(tmp_path / "one")) == 0
    assert run(eight, str(tmp_path / "eight")) == 0
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4, (step, a[step], b[step])


def test_sigterm_then_resume_equals_straight_run(tmp_path):
    steps = 40
    # Prefetch on, as in real runs: the saved state must be the consumed position, not the
    # prefetcher's. Two row buckets, so the steps before and after the kill change shape.
    kw = {"train.max_steps": steps, "train.checkpoint_every": 1000, "data.prefetch": 2,
          "data.num_shapes": 2}
    straight = run_cli(tmp_path / "straight", **kw)
    assert straight.returncode == 0, straight.stderr[-2000:]
    rows = {m["step"]: m["data/rows_per_pack"] for m in read_metrics(str(tmp_path / "straight"))
            if "data/rows_per_pack" in m}
    assert len(set(rows.values())) == 2, rows

    work = tmp_path / "killed"
    sigterm_then_resume_matches(tmp_path / "straight", work, steps, **kw)


def test_restore_onto_another_mesh(tmp_path):
    base = {"train.max_steps": 5, "data.packs_per_step": 8, "train.checkpoint_every": 3}
    straight = small_config(**base, **{"mesh.data": 8})
    assert run(straight, str(tmp_path / "straight")) == 0
    work = str(tmp_path / "switch")
    first = small_config(**{**base, "train.max_steps": 3}, **{"mesh.data": 8})
    assert run(first, work) == 0
    second = small_config(**base, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    # The run grows from 3 to 5 steps (the lr schedule's length): an explicit override.
    with pytest.raises(ConfigError, match="train.max_steps 3 -> 5"):
        run(second, work)
    assert run(second, work, allow_config_change=True) == 0
    a, b = train_losses(tmp_path / "straight"), train_losses(work)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4, (s, a[s], b[s])


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    work = str(tmp_path / "w")
    assert run(small_config(**{"train.max_steps": 1}), work) == 0
    other = small_config(**{"train.max_steps": 2, "model.hidden_size": 96})
    with pytest.raises(ConfigError, match="model.hidden_size: checkpoint 64, config 96"):
        run(other, work)


def test_cli_override_takes_effect_and_unknown_is_rejected(tmp_path):
    ok = run_cli(tmp_path / "ok", **{"train.max_steps": 2})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert sorted(train_losses(tmp_path / "ok")) == [1, 2]
    bad = run_cli(tmp_path / "bad", **{"train.max_steps": 2, "model.num_layerz": 3})
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown config field 'model.num_layerz'"
    missing = subprocess.run(cli_args(tmp_path / "m")[:3] + ["--config=configs/nope.py"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: config file 'configs/nope.py' does not exist"


def test_demo_validation_loss_falls(tmp_path):
    cfg = small_config(**{"train.max_steps": 150, "train.validation_every": 150,
                          "train.checkpoint_every": 1000, "eval.retrieval_every": 150,
                          "eval.heldout": True})
    assert run(cfg, str(tmp_path)) == 0
    logged = read_metrics(str(tmp_path))
    # The periodic retrieval evaluator ran from inside the loop, on the held-out split.
    assert any(k.startswith("eval/") and k.endswith("ndcg@10") for m in logged for k in m)
    val = {m["step"]: m for m in logged if "val/total" in m}
    assert sorted(val) == [0, 150]
    assert val[150]["val/total"] < 0.8 * val[0]["val/total"], val
    assert val[150]["val/acc_in_batch"] > 1.5 * val[150]["val/acc_in_batch_chance"], val[150]


def test_prefetch_thread_ends_with_the_run(tmp_path, monkeypatch):
    """The data iterator's prefetch thread (data.prefetch > 0) ends when train.run returns,
    even while something still holds the iterator; so does every other thread the run
    started (checkpointing, TensorBoard)."""
    import threading

    import tqdm

    from mlembed_jax import train

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # tqdm's own monitor thread
    held, real = [], train.make_train_iterator
    monkeypatch.setattr(train, "make_train_iterator",
                        lambda *a, **k: held.append(real(*a, **k)) or held[-1])
    before = set(threading.enumerate())
    config = small_config(**{"train.max_steps": 3, "data.prefetch": 2,
                             "mesh.num_devices": 1})
    assert run(config, str(tmp_path)) == 0
    assert len(held) == 1  # the iterator is still referenced here
    time.sleep(0.5)  # a thread told to stop gets a moment to return
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, left
