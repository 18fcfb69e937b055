"""Orbax checkpoints of a run: train state, data-iterator state, config and fingerprints,
saved together, and read back only once verified.

Items of a step directory: `state` (params, optimizer state, step, rng), `data` (each
process's iterator position as `process_<i>-of-<n>.json`, written by grain's handler from a
`DataStateBox`), `config` (the run config as JSON) and `integrity` (per-tensor checksums and
finiteness, plus the run's count of skipped non-finite steps; verify.py).
Checkpoints written before `integrity` existed still load, with a note that their bytes
cannot be verified.

Saves are asynchronous. A state holding NaN/inf is never saved; a save that would not fit
the free disk space is refused; a background save that fails is reported by `poll()` (called
every step, one or two steps after the failure) and its temporary directory removed, so the
previous checkpoint stays the newest. Rotation (an Orbax preservation policy) keeps the
newest `keep` checkpoints and the newest one a later finite loss has shown sound
(WORKDIR/sound_checkpoints.json); a run stopped by a fault moves those never shown sound to
WORKDIR/unsound_checkpoints. Restores go through an abstract target carrying the *current*
mesh's shardings, so a run resumes on another mesh or device count, then check the
fingerprints; a checkpoint that does not read back as saved is `CheckpointDamaged`, and
`restore_latest` sets it aside and falls back to the next older one. A checkpoint of another
model shape is caught by comparing the saved config first, with one clear error. Reading a
step without training (the tools): reader.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mlembed_jax import storage
from mlembed_jax.checkpoint.lora_base import check_same_base
from mlembed_jax.checkpoint.orbax_logs import quiet_task_noise
from mlembed_jax.checkpoint.reader import (
    DAMAGED_DIR,
    ITEMS,
    SOUND_FILE,
    TMP_MARK,
    UNSOUND_DIR,
    check_complete,
    check_same_model,
    finished_steps,
    read_integrity,
    read_json_item,
    reason,
    shapes,
    state_metadata,
)
from mlembed_jax.checkpoint.verify import (
    CheckpointDamaged,
    CheckpointError,
    Integrity,
    compare,
    device_fingerprint,
    nonfinite_leaves,
)
from mlembed_jax.config import ConfigError, config_json

__all__ = ["CheckpointSaveError", "Checkpointer", "DataStateBox", "human_bytes"]


class CheckpointSaveError(RuntimeError):
    """A save that failed or was refused; the message names the step and what was kept."""


def human_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1: 3.4 MB reads '3.2 MiB'
    (not '0.00 GiB')."""
    value, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{int(n)} B" if unit == "B" else f"{value:.1f} {unit}"

def _agree(flag: bool) -> bool:
    """True on every process iff `flag` is True on every process (one process: `flag`)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))

class DataStateBox:
    """The data iterator's state as an Orbax item: a JSON-able dict with the
    get_state/set_state/start_prefetch grain's handler calls. It holds a snapshot taken at
    save time, so an async save never sees a later position of the iterator."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        """Grain calls this after a restore; a snapshot has nothing to prefetch."""
        return None

@dataclasses.dataclass
class _NewestSound:
    """Orbax preservation policy: keeps the newest checkpoint a later step has shown sound
    (Checkpointer.confirm), whatever LatestN beside it drops."""

    sound: set

    def should_preserve(self, checkpoints, *, context):
        del context
        sound = [c.step for c in checkpoints if c.step in self.sound]
        return [bool(sound) and c.step == max(sound) for c in checkpoints]


class Checkpointer:
    """Wraps an orbax CheckpointManager at `workdir/checkpoints` (see the module docstring).

    Rotation keeps the newest `keep` checkpoints and, beside them, the newest *sound* one: a
    checkpoint is sound once a later step computed a finite loss with its params (`confirm`).
    Until then it is unverified; a run stopped by a fault before confirming it sets it
    aside (`set_aside_unverified`), so a resume never starts from it."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
                 lora_base: dict | None = None):
        """lora_base: a LoRA run's frozen base, {"path", "fingerprint"} (lora_base.py):
        recorded with every save, and a restore of adapters of another base is refused."""
        quiet_task_noise()
        self.lora_base = lora_base
        self.workdir = storage.absolute(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._sound_path = os.path.join(self.workdir, SOUND_FILE)
        self.sound: set[int] = set(self._read_sound())
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), _NewestSound(self.sound)])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                                 cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save),
            item_names=ITEMS,
        )
        self._pending: int | None = None  # the step of the background save in flight
        self._ahead = None  # while it is in flight: the last step's output (see poll)
        self.unverified: list[int] = []  # saved (or resumed from), no finite loss after yet

    # ------------------------------------------------------------------------- soundness
    def _read_sound(self) -> list[int]:
        if not storage.exists(self._sound_path):
            return []
        try:
            steps = json.loads(storage.read_text(self._sound_path))["sound"]
            return [int(s) for s in steps]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self._sound_path} is unreadable ({reason(e)}); it lists "
                                  "the checkpoints known sound: delete it to treat none as "
                                  "known") from None

    def track(self, step: int) -> None:
        """A checkpoint this run saved or resumed from: unverified until `confirm`."""
        if step not in self.sound and step not in self.unverified:
            self.unverified.append(step)

    def confirm(self, finite_step: int) -> None:
        """Step `finite_step` had a finite loss: every unverified checkpoint before it is
        sound (the steps between were skipped, so that loss was computed with its params)."""
        done = [s for s in self.unverified if s < finite_step]
        if not done:
            return
        self.unverified = [s for s in self.unverified if s >= finite_step]
        self.sound.update(done)
        on_disk = set(finished_steps(self.directory)) | set(done)
        self.sound.intersection_update(on_disk)  # forget rotated-out steps
        if jax.process_index() == 0:
            try:
                storage.write_text_atomic(json.dumps({"sound": sorted(self.sound)}),
                                          self._sound_path)
            except (OSError, storage.StorageError) as e:
                raise CheckpointSaveError(f"recording checkpoint {max(done)} as sound failed: "
                                          f"{reason(e)}") from None

    def set_aside_unverified(self) -> list[tuple[int, str]]:
        """Moves every unverified checkpoint to WORKDIR/unsound_checkpoints (kept, out of the
        rotation and of a resume's reach); returns [(step, new path)]."""
        self.wait()
        moved = []
        for step in self.unverified:
            if step in finished_steps(self.directory):
                moved.append((step, self._set_aside(step, UNSOUND_DIR)))
        self.unverified = []
        return moved

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ----------------------------------------------------------------------------- saving
    def save(self, step: int, state, data_box, config, nonfinite_total: int = 0,
             force: bool = False) -> bool:
        """Starts an async save; `data_box` is a DataStateBox snapshot of this process.

        Raises CheckpointSaveError (nothing written) when the previous save failed, the state
        holds NaN/inf, or the disk lacks the space; the last checkpoint then stays as it was.
        """
        self.wait()
        tensors = device_fingerprint(state)  # the one host sync a save adds
        bad = nonfinite_leaves(tensors)
        if bad:
            raise CheckpointSaveError(
                f"step {step}: the train state holds NaN or inf ({bad[0]}"
                f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}); not saved, "
                f"so {self.newest()} stays the newest checkpoint")
        self._check_free_space(step, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.PyGrainCheckpointSave(data_box),
            config=ocp.args.JsonSave(config_json(config)),
            integrity=ocp.args.JsonSave(
                Integrity(tensors, nonfinite_total, self.lora_base).to_json(step)),
        )
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - the synchronous part: mkdir, host copies
            self._remove_partial()
            raise CheckpointSaveError(f"saving checkpoint {step} failed: {reason(e)}; "
                                      f"{self.newest()} stays the newest checkpoint, which a "
                                      "rerun with the same --workdir resumes from") from None
        if saved:
            self._pending = step
            self.track(step)
        return saved

    def poll(self, step_output=None) -> None:
        """Called every step; raises CheckpointSaveError once the background save in flight
        has failed.

        step_output: any array the step just produced (its metrics). While a save is in
        flight, poll first waits for the *previous* step's output: the host then runs at most
        one step ahead of the device, so a failure is seen one or two steps after it happens.
        Otherwise the host queues every step up to the next log step within milliseconds
        of the save, polls each time before the write can fail, and only learns of it at
        the next sync (a log or checkpoint step). Step N+1 is already queued when step N is
        waited for, so the device never idles; without a save in flight nothing waits."""
        if self._pending is None:
            self._ahead = None
            return
        if self._ahead is not None:
            jax.block_until_ready(self._ahead)
        self._ahead = step_output
        if not self.manager.is_saving_in_progress():
            self.wait()

    def poll_all(self) -> None:
        """`poll` for several processes: a save that failed on any of them fails on all, so
        every process stops at the same step. Costs one small all-gather."""
        failed = None
        try:
            self.poll()
        except CheckpointSaveError as e:
            failed = e
        if not _agree(failed is None):
            raise failed or CheckpointSaveError("a checkpoint save failed on another process")

    def wait(self) -> None:
        """Waits for the save in flight; CheckpointSaveError if it failed."""
        step, self._pending, self._ahead = self._pending, None, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the background write raised
            self._remove_partial()
            where = f"checkpoint {step}" if step is not None else "a checkpoint"
            raise CheckpointSaveError(f"saving {where} failed: {reason(e)}; the partial save "
                                      f"was removed and {self.newest()} stays the newest "
                                      "checkpoint, which a rerun with the same --workdir "
                                      "resumes from") from None

    def close(self):
        """Waits for the save in flight (CheckpointSaveError if it failed) and closes."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # an error wait() reported may come again
                self.manager.close()

    def newest(self) -> str:
        """'step N (path)' of the newest finished checkpoint, or 'no checkpoint'."""
        # From disk: the manager forgets a step it plans to rotate out as soon as the next
        # save starts, though the step stays until that save succeeds.
        steps = [s for s in finished_steps(self.directory) if s != self._pending]
        return f"step {steps[-1]} ({self.step_dir(steps[-1])})" if steps else "no checkpoint"

    def _check_free_space(self, step: int, state) -> None:
        if storage.is_url(self.directory):
            return  # an object store has no free space to ask for; a quota error is reported
        need = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
        free = shutil.disk_usage(self.directory).free
        ok = _agree(free >= need + need // 20 + (16 << 20))  # 5% + 16 MiB for metadata
        if not ok:
            raise CheckpointSaveError(
                f"not enough free space for checkpoint {step} in {self.directory}: it needs "
                f"about {human_bytes(need)}, {human_bytes(free)} are free; free some space or "
                f"move --workdir, then rerun to resume from {self.newest()}")

    def _remove_partial(self) -> None:
        """Deletes the temporary directories of unfinished saves (never a finished step)."""
        if jax.process_index() != 0 or not storage.isdir(self.directory):
            return
        for name in storage.listdir(self.directory):
            if TMP_MARK in name:
                storage.rmtree(os.path.join(self.directory, name))

    # ---------------------------------------------------------------------------- restoring
    def saved_config(self, step: int) -> dict:
        return read_json_item(self.step_dir(step), "config")

    def restore(self, step: int, abstract_state, config, data_box):
        """(state, data_box, integrity or None) of `step`, placed by the shardings in
        `abstract_state` and verified against its fingerprints.

        ConfigError: the checkpoint belongs to another model or optimizer layout.
        CheckpointDamaged: it does not read back as saved (missing or unreadable files,
        checksum mismatch, NaN/inf).
        """
        step_dir = self.step_dir(step)
        check_complete(step_dir)
        check_same_model(self.saved_config(step)["model"], config.model.to_dict(), step_dir)
        integrity = read_integrity(step_dir)
        check_same_base(integrity.lora_base if integrity else None, self.lora_base, step_dir)
        saved, wanted = shapes(state_metadata(step_dir)), shapes(abstract_state)
        if saved != wanted:
            raise ConfigError(
                f"checkpoint {step_dir} holds a train state of another layout ({len(saved)} "
                f"tensors, this config makes {len(wanted)}; optimizer settings such as "
                "optim.mel_lr change it). Resume with the config it was saved with, or use a "
                "fresh --workdir.")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.PyGrainCheckpointRestore(data_box)))
        except (RuntimeError, MemoryError):
            raise  # XLA or memory trouble of this machine, not of the files
        except Exception as e:  # noqa: BLE001 - TensorStore/grain errors of damaged files
            raise CheckpointDamaged(reason(e)) from None
        why = compare(integrity.tensors if integrity else {}, device_fingerprint(out["state"]))
        if why:
            raise CheckpointDamaged(why)
        return out["state"], out["data"], integrity

    def restore_latest(self, abstract_state, config, make_data_box, log,
                       restart_from_scratch: bool = False):
        """The newest checkpoint that reads back as saved: (step, state, data_box, integrity),
        or None when there is none. Each damaged newer one is reported through `log` and
        moved to WORKDIR/damaged_checkpoints (kept for inspection, out of the rotation).

        A workdir whose every checkpoint was found damaged stays refused (CheckpointError)
        until `restart_from_scratch`, which sets its metrics.jsonl aside beside them and
        returns None (a fresh start)."""
        damaged = os.path.join(self.workdir, DAMAGED_DIR)
        orphaned = not self.steps() and storage.isdir(damaged) and storage.listdir(damaged)
        if restart_from_scratch and not orphaned:
            raise ConfigError(
                "--restart_from_scratch is for a workdir whose every checkpoint was damaged; "
                f"{self.directory} " + ("holds checkpoints: rerun without it to resume, or use "
                                        "a new --workdir" if self.steps() else
                                        "has none: rerun without it"))
        if orphaned and restart_from_scratch:
            metrics = os.path.join(self.workdir, "metrics.jsonl")
            if jax.process_index() == 0 and storage.exists(metrics):
                storage.move(metrics, os.path.join(
                    damaged, f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
            log(f"restarting from scratch; the damaged checkpoints and the old metrics.jsonl "
                f"stay in {damaged}")
            return None
        if orphaned:
            raise CheckpointError(self._no_intact(damaged))
        skipped = []
        for step in reversed(self.steps()):
            try:
                state, box, integrity = self.restore(step, abstract_state, config,
                                                     make_data_box())
                failed = None
            except CheckpointDamaged as e:
                state = box = integrity = None
                failed = str(e)
            if not _agree(failed is None):
                failed = failed or "another process could not read it"
                dest = self._set_aside(step)
                log(f"warning: checkpoint {step} is damaged ({failed}); skipped it and moved "
                    f"it to {dest}")
                skipped.append(step)
                continue
            return step, state, box, integrity
        if skipped:
            raise CheckpointError(self._no_intact(damaged))
        return None

    def _no_intact(self, damaged: str) -> str:
        return (f"no intact checkpoint in {self.directory}: every one was damaged (moved to "
                f"{damaged}); to start afresh use a new --workdir, or pass "
                "--restart_from_scratch to train this one from step 0 (the damaged "
                "checkpoints stay where they are)")

    def _set_aside(self, step: int, under: str = DAMAGED_DIR) -> str:
        dest = os.path.join(self.workdir, under, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            storage.makedirs(os.path.dirname(dest))
            storage.move(self.step_dir(step), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mlembed_set_aside_{step}")
        self.manager.reload()
        return dest
