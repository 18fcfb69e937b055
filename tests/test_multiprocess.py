"""Multi-process training through JAX's own distributed runtime, on this machine.

Two `python -m mlembed_jax.train` processes with 4 fake CPU devices each, coordinated by
jax.distributed on localhost (gloo collectives), must train exactly like one process with 8
devices on the same (data 2, fsdp 2, tensor 2) mesh: same global batches, each process
building only its own packs. A SIGTERM to one of them stops both at one common step with a
cooperative checkpoint (one data-iterator state per process), and the restarted pair
resumes it and finishes with the same per-step losses.
"""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from train_helpers import cli_args, small_config, subprocess_env, train_losses

from mlembed_jax.train import run

pytestmark = pytest.mark.integration  # starts training processes

STEPS = 16
COMMON = {"train.max_steps": STEPS, "train.checkpoint_every": 1000,
          "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
          # The periodic retrieval eval at the last step runs on every process too.
          "eval.retrieval_every": STEPS, "eval.heldout": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_pair(workdir, tmp_path, tag):
    """Starts processes 0 and 1 of a 2-process run; returns [(Popen, log path)]."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = subprocess_env(devices=4)
        env.update(MLEMBED_COORDINATOR=f"localhost:{port}", MLEMBED_NUM_PROCESSES="2",
                   MLEMBED_PROCESS_ID=str(pid))
        log = tmp_path / f"{tag}_p{pid}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cli_args(workdir, **COMMON), env=env, stdout=f,
                                           stderr=subprocess.STDOUT), log))
    return procs


def _last_logged_step(workdir) -> int:
    """Last step in metrics.jsonl so far (a line being written is skipped)."""
    try:
        return max(train_losses(workdir), default=0)
    except json.JSONDecodeError:
        return 0


def _wait(procs, timeout=240):
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise AssertionError(f"2-process run hung; log:\n{log.read_text()[-3000:]}")
    return codes


@pytest.mark.slow  # ~2 min: two jax.distributed processes; CPU meshes are tested in-process
def test_two_processes_match_one_and_resume_after_sigterm(tmp_path):
    # Reference: one process, 8 devices, same mesh shape, straight through.
    assert run(small_config(**COMMON), str(tmp_path / "one")) == 0
    ref = train_losses(tmp_path / "one")
    assert sorted(ref) == list(range(1, STEPS + 1))

    work = tmp_path / "two"
    procs = _start_pair(work, tmp_path, "first")
    deadline = time.time() + 240
    while time.time() < deadline and _last_logged_step(work) < 3:
        assert all(p.poll() is None for p, _ in procs), \
            [log.read_text()[-3000:] for _, log in procs]
        time.sleep(0.05)
    # Preempt only the non-primary process: the preemption service must stop both.
    procs[1][0].send_signal(signal.SIGTERM)
    codes = _wait(procs)
    logs = [log.read_text() for _, log in procs]
    assert codes == [143, 143], (codes, [t[-3000:] for t in logs])

    ckpts = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert len(ckpts) == 1 and 3 <= ckpts[0] < STEPS, ckpts
    # Written cooperatively: one data-iterator state per process, each with its own packs
    # (4 packs per step, 2 on each process's 4 devices), both at the checkpoint's step.
    data_dir = work / "checkpoints" / str(ckpts[0]) / "data"
    states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert [s["pack_range"] for s in states] == [[0, 2], [2, 4]]
    assert [s["step"] for s in states] == [ckpts[0]] * 2

    procs = _start_pair(work, tmp_path, "resumed")
    codes = _wait(procs)
    logs = [log.read_text() for _, log in procs]
    assert codes == [0, 0], (codes, [t[-3000:] for t in logs])
    assert f"resumed from {work / 'checkpoints' / str(ckpts[0])}" in logs[0]

    two = train_losses(work)  # written by process 0 only, across both runs
    assert sorted(two) == list(range(1, STEPS + 1))
    diffs = {s: abs(two[s] - ref[s]) for s in ref}
    assert max(diffs.values()) <= 1e-5, diffs
    # Retrieval eval on params sharded over two processes scores like one process.
    ev_ref, ev_two = (_eval_metrics(w, STEPS) for w in (tmp_path / "one", work))
    assert ev_ref and ev_ref.keys() == ev_two.keys(), (ev_ref, ev_two)
    for k in ev_ref:
        assert abs(ev_ref[k] - ev_two[k]) <= 1e-6, (k, ev_ref[k], ev_two[k])


def _eval_metrics(workdir, step) -> dict:
    from mlembed_jax.metrics_log import read_metrics

    return {k: v for m in read_metrics(str(workdir)) if m["step"] == step
            for k, v in m.items() if k.startswith("eval/") and k != "eval/seconds"}
