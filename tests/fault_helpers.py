"""Real faults for the failure tests: damaged checkpoint files, read-only directories, a
per-process file-size limit (the disk-full case), and a checkpoint in the layout written
before fingerprints existed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest


def state_data_files(step_dir: str) -> list[str]:
    """The OCDBT data files of a step's `state` item (where the tensors' bytes are)."""
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.sep + "d" in root:
            out += [os.path.join(root, f) for f in files]
    assert out, f"no state data files under {step_dir}"
    return sorted(out)


def write_random_bytes(path: str, seed: int = 0, size: int = 4096) -> None:
    """Overwrites `size` bytes at a quarter of the file with random ones (in place)."""
    data = bytearray(open(path, "rb").read())
    at = len(data) // 4
    n = min(size, len(data) - at)
    data[at:at + n] = np.random.default_rng(seed).bytes(n)
    with open(path, "wb") as f:
        f.write(bytes(data))


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _writable(path: str) -> bool:
    probe = os.path.join(path, ".probe")
    try:
        with open(probe, "w"):
            pass
    except OSError:
        return False
    os.remove(probe)
    return True


@contextlib.contextmanager
def read_only_dir(path: str):
    """`path` as a directory nobody can write to: mode 0555, or for root (which ignores
    modes) the immutable attribute. Skips the test where neither holds."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    immutable = False
    try:
        if _writable(path):  # root
            with contextlib.suppress(OSError):
                immutable = subprocess.run(["chattr", "+i", path],
                                           capture_output=True).returncode == 0
            if _writable(path):
                pytest.skip("cannot make a read-only directory here (root without chattr)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", path], capture_output=True)
        os.chmod(path, 0o755)


def with_file_size_limit(argv: list[str], max_bytes: int) -> list[str]:
    """`argv` run so that no file it writes may grow past `max_bytes`: writes then fail with
    EFBIG, as on a full disk they fail with ENOSPC. A Python shim sets the limit and execs
    (no preexec_fn: forking the multithreaded test process risks a deadlock)."""
    shim = ("import os, resource, signal, sys; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # else the kernel kills it
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, {max_bytes})); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", shim] + list(argv)


def save_old_format(workdir: str, step: int, state, data_state: dict, config) -> str:
    """A checkpoint as mlembed_jax wrote it before fingerprints: items state, data, config
    (the same Orbax calls the old Checkpointer made). Returns the step directory."""
    import grain.python as grain
    import orbax.checkpoint as ocp

    from mlembed_jax.checkpoint.manager import DataStateBox
    from mlembed_jax.config import config_json

    directory = os.path.join(workdir, "checkpoints")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True),
        item_names=("state", "data", "config"))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.PyGrainCheckpointSave(DataStateBox(data_state)),
        config=ocp.args.JsonSave(config_json(config))), force=True)
    manager.wait_until_finished()
    manager.close()
    return os.path.join(directory, str(step))


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


@contextlib.contextmanager
def full_tmpfs(path: str, size_kib: int = 256, leave_bytes: int = 0):
    """A real tmpfs of `size_kib` mounted at `path`, filled by one file until `leave_bytes`
    remain free: writes past that fail with ENOSPC, as on a full disk. Skips the test where
    mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        free = shutil.disk_usage(path).free - leave_bytes
        with open(os.path.join(path, "filler"), "wb") as f:
            with contextlib.suppress(OSError):
                f.write(b"\0" * max(free, 0))
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
