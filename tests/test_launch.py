"""Launch scripts (--dry-run prints exactly what they would run) and the SLURM side of
mlembed_jax.distributed."""

import os
import shlex
import subprocess
import sys

import pytest
from train_helpers import ROOT

from mlembed_jax import distributed

LAUNCH = os.path.join(ROOT, "launch")


def dry(script, *args, env=None):
    r = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_local_single_process():
    py = os.path.join(ROOT, ".venv", "bin", "python")
    py = py if os.access(py, os.X_OK) else "python3"
    lines = dry("local.sh", "--config=configs/demo.py", "--workdir=runs/a b",
                env={"PYTHON": ""})
    assert lines == [f"cd {shlex.quote(ROOT)} && env {py} -m mlembed_jax.train "
                     "--config=configs/demo.py --workdir=runs/a\\ b"]


def test_local_two_processes_on_fake_cpu_devices():
    lines = dry("local.sh", "--processes=2", "--cpu-devices=4", "--port=23999",
                "--config=configs/demo.py", "--workdir=w", env={"PYTHON": "py3"})
    common = ("env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
              "MLEMBED_COORDINATOR=localhost:23999 MLEMBED_NUM_PROCESSES=2")
    tail = "py3 -m mlembed_jax.train --config=configs/demo.py --workdir=w &"
    assert lines == [f"cd {ROOT} && {common} MLEMBED_PROCESS_ID=0 {tail}",
                     f"cd {ROOT} && {common} MLEMBED_PROCESS_ID=1 {tail}", "wait"]
    # With accelerators each process drives one of them.
    lines = dry("local.sh", "--processes=2", "--config=c", env={"PYTHON": "py3"})
    assert "MLEMBED_PROCESS_ID=1 MLEMBED_LOCAL_DEVICE_IDS=1 py3" in lines[1]


@pytest.mark.integration
def test_tpu_pod_runs_the_same_command_on_every_worker():
    lines = dry("tpu_pod.sh", "--tpu=pod-1", "--zone=us-east5-a", "--project=p", "--setup",
                "--config=configs/8b.py", "--workdir=/mnt/shared/8b",
                "--config.train.max_steps=10")
    ssh = "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=p --worker=all"
    pin_check = ("from mlembed_jax.perf.aot_target import check_libtpu as c; m = c(None); "
                 "m and print(m); raise SystemExit(1 if m else 0)")
    assert lines == [
        f"{ssh} --command 'cd ~/mlembed_jax && python3 -m venv .venv && .venv/bin/pip install"
        f" -q --upgrade pip && .venv/bin/pip install -q -e \".[tpu]\" && .venv/bin/python -c "
        f"\"{pin_check}\"'",
        f"{ssh} --command 'cd ~/mlembed_jax && MLEMBED_DISTRIBUTED=auto .venv/bin/python -m "
        "mlembed_jax.train --config=configs/8b.py --workdir=/mnt/shared/8b "
        "--config.train.max_steps=10'"]
    # The printed line is one shell command whose --command is one argument.
    words = shlex.split(lines[1])
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert words[-2] == "--command" and words[-1].startswith("cd ~/mlembed_jax && ")
    # Without a TPU name it refuses.
    r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--zone=z",
                        "--config=c"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tpu=NAME" in r.stderr
    # The setup's pin check is valid Python that passes where libtpu follows jax's pin (or,
    # as on this CPU machine, is not importable at all).
    r = subprocess.run([sys.executable, "-c", pin_check], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.integration
def test_tpu_pod_two_slices_run_on_every_node_of_a_queued_resource():
    lines = dry("tpu_pod.sh", "--queued-resource=qr-8b", "--zone=us-east5-a",
                "--config=configs/8b.py", "--workdir=/mnt/shared/8b")
    assert lines == [
        "gcloud compute tpus queued-resources ssh qr-8b --zone=us-east5-a --node=all "
        "--worker=all --command 'cd ~/mlembed_jax && MLEMBED_DISTRIBUTED=auto .venv/bin/python "
        "-m mlembed_jax.train --config=configs/8b.py --workdir=/mnt/shared/8b'"]
    r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--zone=z",
                        "--tpu=a", "--queued-resource=b", "--config=c"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "one of --tpu=NAME or --queued-resource=QR" in r.stderr


@pytest.mark.integration
def test_slurm_sets_flags_before_python_and_runs_srun():
    lines = dry("slurm_gpu.sbatch", "--config=configs/8b.py", "--workdir=/shared/r",
                env={"PYTHON": "py3", "SLURM_SUBMIT_DIR": "/home/u/mlembed_jax", "XLA_FLAGS": "",
                     "XLA_PYTHON_CLIENT_MEM_FRACTION": "", "JAX_COMPILATION_CACHE_DIR": "",
                     "HOME": "/home/u"})
    assert lines[0] == "cd /home/u/mlembed_jax"
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines[1:-1])
    assert lines[-1] == ("srun --kill-on-bad-exit=1 --cpu-bind=none py3 -m mlembed_jax.train "
                         "--config=configs/8b.py --workdir=/shared/r")
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert exports["NCCL_DEBUG"] == "WARN"
    assert exports["JAX_COMPILATION_CACHE_DIR"] == "/home/u/.cache/mlembed_jax/jax"
    flags = exports["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert any(f.startswith("--xla_gpu_all_gather_combine_threshold_bytes=") for f in flags)
    # Every flag must be one this jaxlib knows: XLA aborts at start-up on an unknown flag
    # (checked here on CPU; the flags are parsed the same way on every backend).
    r = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # The #SBATCH header is what sbatch reads: 8 GPUs a node, SIGTERM before the time limit.
    header = open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()
    assert "#SBATCH --gpus-per-node=8" in header and "#SBATCH --signal=TERM@300" in header


@pytest.mark.integration
def test_launch_scripts_parse():
    for name in ("local.sh", "tpu_pod.sh", "slurm_gpu.sbatch", "xla_gpu_flags.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True,
                           text=True)
        assert r.returncode == 0, (name, r.stderr)


# ------------------------------------------------------------------------------------------
# mlembed_jax.distributed: what each SLURM layout hands to jax.distributed.initialize.


def test_first_slurm_host():
    assert distributed.first_slurm_host("gpu[003-010,012],cpu1") == "gpu003"
    assert distributed.first_slurm_host("node7,node9") == "node7"
    assert distributed.first_slurm_host("a-b[1,4]") == "a-b1"


SLURM_BASE = {"SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "h100-[07-10]",
              "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "2"}


def test_slurm_one_process_per_node_drives_every_gpu():
    env = {**SLURM_BASE, "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}
    assert distributed.cluster_kind(env) == "slurm"
    # No local_device_ids: the process takes all 8 GPUs of its node (JAX's own SLURM
    # detection would have pinned it to GPU 0).
    assert distributed.slurm_params(env) == {
        "coordinator_address": "h100-07:61441", "num_processes": 4, "process_id": 2}


@pytest.mark.parametrize("visible, want", [(None, [5]), ("0,1,2,3,4,5,6,7", [5]), ("5", [0])])
def test_slurm_one_process_per_gpu(visible, want):
    env = {**SLURM_BASE, "SLURM_NTASKS": "32", "SLURM_PROCID": "21", "SLURM_LOCALID": "5",
           "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "MLEMBED_COORDINATOR_PORT": "6000"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    p = distributed.slurm_params(env)
    assert p["coordinator_address"] == "h100-07:6000" and p["num_processes"] == 32
    assert p["local_device_ids"] == want  # all GPUs visible: its own; bound by SLURM: the one


def test_explicit_and_single_process_environments():
    assert distributed.cluster_kind({}) is None
    assert distributed.cluster_kind({"SLURM_NTASKS": "1"}) is None
    assert distributed.cluster_kind({"MLEMBED_DISTRIBUTED": "auto"}) == "auto"
    assert distributed.cluster_kind({"TPU_WORKER_HOSTNAMES": "h0,h1"}) == "tpu"
    env = {"MLEMBED_COORDINATOR": "n0:1234", "MLEMBED_NUM_PROCESSES": "2",
           "MLEMBED_PROCESS_ID": "1", "MLEMBED_LOCAL_DEVICE_IDS": "2,3", **SLURM_BASE}
    assert distributed.cluster_kind(env) == "explicit"  # explicit wins over SLURM
    assert distributed.explicit_params(env) == {
        "coordinator_address": "n0:1234", "num_processes": 2, "process_id": 1,
        "local_device_ids": [2, 3]}
    with pytest.raises(RuntimeError, match="MLEMBED_PROCESS_ID"):
        distributed.explicit_params({"MLEMBED_COORDINATOR": "n0:1",
                                     "MLEMBED_NUM_PROCESSES": "2"})
