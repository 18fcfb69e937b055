"""Training-run faults the run must survive with its good checkpoints: a diverging learning
rate, a checkpoint never shown sound, a full disk at start and during a background save, a
workdir whose every checkpoint is damaged. Real faults: lr 1e6, NaN steps inside the jitted
step, a full tmpfs, a per-process file-size limit, random bytes in the state files."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from fault_helpers import full_tmpfs, state_data_files, with_file_size_limit, write_random_bytes
from train_helpers import ROOT, cli_args, small_config, subprocess_env, train_losses

from mlembed_jax.checkpoint.manager import Checkpointer, human_bytes
from mlembed_jax.checkpoint.verify import CheckpointError
from mlembed_jax.config import ConfigError, validate
from mlembed_jax.train import run

pytestmark = pytest.mark.integration  # trains, with real faults


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_diverging_lr_keeps_the_good_checkpoints_and_the_workdir_still_encodes(tmp_path):
    """The probe's case, small: 6 steps (checkpoints 2, 4, 6), then a resume at lr 1e6 with a
    checkpoint every 2 steps. AdamW's decay (lr x wd = 1e4) makes every weight flip and grow
    while the loss stays finite; the parameter-norm rule stops the run at its first check,
    before any such state is saved. Then the `next:` encode command, run as printed from the
    first run's report, writes finite embeddings from the pre-divergence checkpoint."""
    work = tmp_path / "run"
    env = subprocess_env()
    kw = {"train.max_steps": 6, "train.checkpoint_every": 2, "mesh.num_devices": 1}
    first = subprocess.run(cli_args(work, **kw), env=env, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    encode_line = next(ln.strip() for ln in first.stdout.splitlines()
                       if "-m mlembed_jax.encode" in ln)
    assert os.path.isfile(work / "texts.txt")
    # The interpreter as a fresh shell in the checkout reaches it (.venv/bin/python there).
    assert shlex.split(encode_line)[0] == os.path.relpath(sys.executable, ROOT), encode_line

    kw.update({"train.max_steps": 20, "optim.lr": 1e6})
    diverged = subprocess.run(cli_args(work, **kw) + ["--allow_config_change"], env=env,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    errors = _errors(diverged.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: step 7: the run diverged: the "
                                                     "parameter norm "), diverged.stderr[-3000:]
    assert f"Newest checkpoint on disk: step 6 ({work}/checkpoints/6)" in errors[0]
    assert "Traceback" not in diverged.stderr
    assert Checkpointer(str(work)).steps() == [2, 4, 6]  # nothing of the divergence saved
    assert max(train_losses(work)) == 7

    done = subprocess.run(encode_line, shell=True, env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    emb = np.load(work / "emb.npy")
    assert emb.shape[0] == 7 and np.isfinite(emb).all()


def test_diverging_lr_from_scratch_saves_nothing(tmp_path, capsys):
    """lr 1e6 from random weights: the first check (step 1, log_every=1) sees the norm jump
    and the run stops before its first save, leaving no checkpoint to resume or encode."""
    cfg = small_config(**{"train.max_steps": 6, "train.checkpoint_every": 2,
                          "mesh.num_devices": 1, "optim.lr": 1e6, "optim.warmup_steps": 0})
    work = str(tmp_path / "run")
    assert run(cfg, work) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: step 1: the run diverged"), errors
    assert "No checkpoint is left" in errors[0]
    assert Checkpointer(work).steps() == []


def test_rotation_keeps_the_newest_sound_checkpoint(tmp_path, capsys):
    """keep_checkpoints=1, a checkpoint every 2 steps, steps 7-9 NaN (a streak over
    max_nonfinite_steps=2). Checkpoints 6 and 8 never see a finite loss computed with their
    params; 4 did (step 5). Plain newest-1 rotation would have kept only 8; Orbax's policy
    (LatestN or newest sound) keeps 4 beside it, and the stop sets 8 aside."""
    cfg = small_config(**{"train.max_steps": 10, "train.checkpoint_every": 2,
                          "train.keep_checkpoints": 1, "mesh.num_devices": 1,
                          "train.debug_nan_steps": (7, 8, 9), "train.max_nonfinite_steps": 2})
    work = str(tmp_path / "run")
    assert run(cfg, work) == 1
    err = capsys.readouterr().err
    errors = _errors(err)
    assert len(errors) == 1 and errors[0].startswith("error: step 9: 3 steps in a row"), err
    assert "Checkpoint 8 was never shown sound" in errors[0]
    assert f"Newest checkpoint on disk: step 4 ({work}/checkpoints/4)" in errors[0]
    assert Checkpointer(work).steps() == [4]
    assert [n.split("-")[0] for n in os.listdir(f"{work}/unsound_checkpoints")] == ["8"]


def test_a_resume_from_an_unconfirmed_checkpoint_is_its_confirmation(tmp_path, capsys):
    """A finished run's last checkpoint (6) has no finite loss after it yet: the same state
    on disk as a SIGKILL between a save and the next step. The resumed run's first steps
    compute their loss with exactly its params; here they are NaN (steps 7-9, a streak over
    max_nonfinite_steps=2), so the stop sets 6 aside, and a rerun resumes from 4, the
    newest sound one."""
    kw = {"train.max_steps": 6, "train.checkpoint_every": 2, "mesh.num_devices": 1}
    work = str(tmp_path / "run")
    assert run(small_config(**kw), work) == 0
    with open(f"{work}/sound_checkpoints.json") as f:
        assert json.load(f) == {"sound": [2, 4]}  # 6: saved, never confirmed
    kw.update({"train.max_steps": 12, "train.max_nonfinite_steps": 2})
    poisoned = small_config(**kw, **{"train.debug_nan_steps": tuple(range(7, 13))})
    capsys.readouterr()
    assert run(poisoned, work, allow_config_change=True) == 1
    out = capsys.readouterr()
    assert f"resumed from {work}/checkpoints/6" in out.out
    errors = _errors(out.err)
    assert len(errors) == 1 and errors[0].startswith("error: step 9: 3 steps in a row"), out.err
    assert "Checkpoint 6 was never shown sound" in errors[0]
    assert f"Newest checkpoint on disk: step 4 ({work}/checkpoints/4)" in errors[0]
    # 8 holds 6's params (step 7 was skipped), saved before the streak stopped the run: set
    # aside too. Its save rotated 2 out (keep 3: 4, 6, 8); 4 is kept as the newest sound.
    assert "Checkpoint 8 was never shown sound" in errors[0]
    assert Checkpointer(work).steps() == [4]
    assert sorted(n.split("-")[0] for n in os.listdir(f"{work}/unsound_checkpoints")) == \
        ["6", "8"]

    assert run(small_config(**kw), work, allow_config_change=True) == 0
    assert f"resumed from {work}/checkpoints/4" in capsys.readouterr().out
    assert max(train_losses(work)) == 12


def test_full_disk_at_start_is_one_line_and_leaves_no_temp_file(tmp_path):
    with full_tmpfs(str(tmp_path / "disk"), size_kib=256) as disk:
        out = subprocess.run(cli_args(f"{disk}/run", **{"train.max_steps": 2}),
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = _errors(out.stderr)
        assert errors == [f"error: cannot write {disk}/run/run_config.json: No space left on "
                          "device; free some space on that disk or choose another --workdir"], \
            out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert not [n for n in os.listdir(f"{disk}/run") if ".tmp" in n]


def test_failed_background_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit under the state's data file (1 MB): the save at step 20 starts (the
    free-space check passes) and its background write fails on its first data file. Orbax's
    log goes to TMPDIR, here a full tmpfs, so the log's own writes fail too: that is
    swallowed, and the run prints exactly one error line and keeps checkpoint 2.

    No log step between the saves (log_every 50), so nothing but the poll syncs the host
    with the device: the failure must be reported soon after 20, not at the next save (40,
    the last step)."""
    work = tmp_path / "run"
    kw = {"train.max_steps": 40, "train.checkpoint_every": 20, "train.log_every": 50,
          "mesh.num_devices": 1}
    env = subprocess_env()
    ok = subprocess.run(cli_args(work, **{**kw, "train.max_steps": 2}), env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    with full_tmpfs(str(tmp_path / "tmp"), size_kib=64) as tmp:
        out = subprocess.run(with_file_size_limit(
            cli_args(work, **kw) + ["--allow_config_change"], 256 * 1024),
                             env={**env, "TMPDIR": tmp}, capture_output=True, text=True,
                             timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = _errors(out.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: saving checkpoint 20 failed: "), \
        out.stderr[-3000:]
    assert errors[0].endswith(f"step 2 ({work}/checkpoints/2) stays the newest checkpoint, "
                              "which a rerun with the same --workdir resumes from"), errors
    assert "Traceback" not in out.stderr and "Logging error" not in out.stderr, out.stderr
    # The progress bar's last count (tqdm redraws it when the run stops) is the last step
    # done. The write itself takes ~1 s here, 5-10 of these small steps; without poll()'s
    # wait the host had queued steps 21-40 before it failed and reported it at 40 (measured
    # 2026-12-05). How close to the failure: tests/test_checkpoint_poll.py.
    done = int(re.findall(r"\| (\d+)/40 ", out.stderr)[-1])
    assert 20 <= done <= 35, out.stderr[-3000:]
    assert sorted(train_losses(work)) == [2, 20]  # metrics rows: the first run's end, the save
    assert sorted(os.listdir(work / "checkpoints")) == ["2"]


def test_no_intact_checkpoint_keeps_refusing_until_restart_from_scratch(tmp_path, capsys):
    cfg = small_config(**{"train.max_steps": 2, "train.checkpoint_every": 1,
                          "train.keep_checkpoints": 2, "mesh.num_devices": 1})
    work = str(tmp_path / "run")
    assert run(cfg, work) == 0
    for step in (1, 2):
        for i, f in enumerate(state_data_files(f"{work}/checkpoints/{step}")):
            write_random_bytes(f, i)
    for _ in range(2):  # the first run finds the damage, the rerun still refuses
        with pytest.raises(CheckpointError, match="no intact checkpoint .* pass "
                                                  "--restart_from_scratch"):
            run(cfg, work)
    assert len(os.listdir(f"{work}/damaged_checkpoints")) == 2
    with pytest.raises(ConfigError, match="--restart_from_scratch is for a workdir"):
        run(cfg, str(tmp_path / "fresh"), restart_from_scratch=True)
    assert run(cfg, work, restart_from_scratch=True) == 0
    kept = sorted(os.listdir(f"{work}/damaged_checkpoints"))
    assert [n.split("-")[0] for n in kept] == ["1", "2", "metrics"], kept
    assert Checkpointer(work).steps() == [1, 2]


def test_max_steps_zero_is_refused_and_sizes_read_in_a_sensible_unit():
    with pytest.raises(ConfigError, match=r"train.max_steps=0 must be >= 1, or -1"):
        validate(small_config(**{"train.max_steps": 0}))
    assert human_bytes(3_400_000) == "3.2 MiB"  # 3400000 / 2**20 = 3.24
    assert human_bytes(512) == "512 B" and human_bytes(5 * 2**30) == "5.0 GiB"


def test_gcsfs_imported_first_still_gets_the_plain_client():
    """gcsfs chooses its zonal-bucket class at import unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
    is false then; a script that imports it before mlembed_jax must still get the plain one
    (the other waits ~60 s per bucket against an emulator)."""
    code = ("import gcsfs, fsspec; before = fsspec.get_filesystem_class('gs').__name__; "
            "import mlembed_jax.storage; print(before, fsspec.get_filesystem_class('gs'))")
    env = {k: v for k, v in subprocess_env().items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ExtendedGcsFileSystem", "<class", "'gcsfs.core.GCSFileSystem'>"]


def test_divergence_rule_against_hand_computed_medians():
    """The rule alone, on norms whose medians are worked out by hand: window 3, factor 10."""
    from ml_collections import ConfigDict

    from mlembed_jax.divergence import DivergenceRule

    rule = DivergenceRule(ConfigDict({"divergence_factor": 10.0, "divergence_window": 3}),
                           start_norm=2.0)
    assert rule(19.9) is None  # window [2]: median 2, limit 20
    assert rule(3.0) is None  # window [2, 19.9]: median 10.95
    # window [2, 19.9, 3]: median 3, limit 30; 31 is 10.3 times that
    assert "10.3 times the median of its last 3 readings (3;" in rule(31.0)
    assert rule(float("inf")).startswith("the parameter norm is inf")
    off = DivergenceRule(ConfigDict({"divergence_factor": 0.0, "divergence_window": 3}), 2.0)
    assert off(1e30) is None and off(float("nan")) is not None  # off: only non-finite stops


def test_orbax_log_on_a_full_disk_neither_prints_nor_replaces_the_runs_error(tmp_path, capfd):
    """Orbax's log file on a full tmpfs: each record refused (ENOSPC) would print a '---
    Logging error ---' traceback with logging's default handler; here nothing is printed,
    and the run's own exception is what leaves the block."""
    import logging

    from mlembed_jax.checkpoint.orbax_logs import orbax_log

    with full_tmpfs(str(tmp_path / "disk"), size_kib=64) as disk:
        with pytest.raises(KeyError, match="the run's own"):
            with orbax_log(f"{disk}/orbax.log"):
                for i in range(3):
                    logging.getLogger("absl").handle(logging.LogRecord(
                        "absl", logging.ERROR, "/site-packages/orbax/checkpoint/x.py", 1,
                        "background save failed " + "x" * 5000, None, None))
                raise KeyError("the run's own")
        assert os.path.exists(f"{disk}/orbax.log")  # it was tried, on the full disk
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
