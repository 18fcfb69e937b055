"""Small training runs on the shipped demo data, shared by the training tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")

# A smaller model than the demo's, so each test run compiles and steps in seconds; one row
# bucket (one compile) unless a test is about the shapes.
SMALL = {
    "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 16,
    "model.mel_r_max": 32, "model.mel_r_min": 8,
    "train.log_every": 1, "train.validation_every": 0, "eval.retrieval_every": 0,
    "data.prefetch": 0, "data.num_shapes": 1,
}


def small_config(**overrides):
    from mlembed_jax.config import load_config_file

    return load_config_file(DEMO, {**SMALL, **overrides})


def cli_args(workdir, **overrides) -> list[str]:
    args = [sys.executable, "-m", "mlembed_jax.train", f"--config={DEMO}", f"--workdir={workdir}"]
    for k, v in {**SMALL, **overrides}.items():
        args.append(f"--config.{k}={v}")
    return args


def subprocess_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(workdir, devices=1, timeout=300, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(workdir, **overrides), env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def train_losses(workdir) -> dict[int, float]:
    from mlembed_jax.metrics_log import read_metrics

    return {m["step"]: m["train/total"] for m in read_metrics(str(workdir)) if "train/total" in m}


def final_params(workdir):
    """The params of the latest checkpoint, restored as host numpy arrays."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.join(str(workdir), "checkpoints")
    mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state",))
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]["params"]


def sigterm_then_resume_matches(straight, work, steps: int, **overrides) -> None:
    """Trains `work` from the command line, SIGTERMs it after step 3, resumes it with the
    same command, and asserts its losses and final params equal `straight`'s (a run of the
    same `steps` and overrides without the interruption) exactly."""
    import signal
    import time

    import jax
    import numpy as np

    proc = subprocess.Popen(cli_args(work, **overrides), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and max(train_losses(work), default=0) < 3:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped_at, _ = final_params(work)
    assert 3 <= stopped_at < steps, "SIGTERM must land mid-run for this test to mean anything"

    resumed = run_cli(work, **overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = train_losses(straight), train_losses(work)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    (sa, pa), (sb, pb) = final_params(straight), final_params(work)
    assert sa == sb == steps
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
