"""Orbax checkpoints of a run: train state, data-iterator state, config and fingerprints,
saved together, and read back only once verified.

Items of a step directory: `state` (params, optimizer state, step, rng), `data` (each
process's iterator position as `process_<i>-of-<n>.json`, written by grain's handler from a
`DataStateBox`), `config` (the run config as JSON) and `integrity` (per-tensor checksums and
finiteness, plus the run's count of skipped non-finite steps; checkpoint_verify.py).
Checkpoints written before `integrity` existed still load, with a note that their bytes
cannot be verified.

Saves are asynchronous. A state holding NaN/inf is never saved; a save that would not fit
the free disk space is refused; a background save that fails is reported by `poll()` (called
every step) and its temporary directory removed, so the previous checkpoint stays the
newest. Rotation (an Orbax preservation policy) keeps the newest `keep` checkpoints and the
newest one a later finite loss has shown sound (WORKDIR/sound_checkpoints.json); a run
stopped by a fault moves those never shown sound to WORKDIR/unsound_checkpoints. Restores go
through an abstract target carrying the *current* mesh's shardings, so a
run resumes on another mesh or device count, then check the fingerprints; a checkpoint that
does not read back as saved is `CheckpointDamaged`, and `restore_latest` sets it aside and
falls back to the next older one. A checkpoint of another model shape is caught by comparing
the saved config first, with one clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time

import grain.python as grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mlembed_jax import storage
from mlembed_jax.checkpoint_verify import (
    CheckpointDamaged,
    CheckpointError,
    Integrity,
    compare,
    device_fingerprint,
    host_fingerprint,
    nonfinite_leaves,
)
from mlembed_jax.config import ConfigError, config_json

__all__ = ["CheckpointDamaged", "CheckpointError", "CheckpointSaveError", "Checkpointer",
           "DataStateBox", "TrainedParams", "load_trained", "resolve_checkpoint"]

ITEMS = ("state", "data", "config", "integrity")
DAMAGED_DIR = "damaged_checkpoints"  # under the workdir: checkpoints set aside, never deleted
UNSOUND_DIR = "unsound_checkpoints"  # under the workdir: saved, then never shown sound
SOUND_FILE = "sound_checkpoints.json"  # under the workdir: steps a later finite loss confirmed
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_MARK = "commit_success.txt"
_DATA_FILE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


class CheckpointSaveError(RuntimeError):
    """A save that failed or was refused; the message names the step and what was kept."""


def _reason(e: BaseException) -> str:
    """One line from an exception. TensorStore nests its causes left to right ("Error
    writing ...: Failed writing ...: File too large"), with the spec as a JSON blob: keep
    the head and the innermost cause."""
    text = " ".join(re.sub(r"\[(tensorstore_spec|source locations)='.*?'\]", "",
                           str(e)).split()) or type(e).__name__
    if len(text) <= 240:
        return text
    return f"{text[:100]} ... {text[-130:]}"


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


class _OrbaxLogFilter(logging.Filter):
    """Keeps Orbax's own records (a failed background save logs ~600 lines of tracebacks)
    off the console; `orbax_log` writes them to a file instead (or drops them)."""

    def filter(self, record):
        return "/orbax/" not in record.pathname.replace(os.sep, "/")


def _closed_loop_noise(exc_type, exc, tb) -> bool:
    """TensorStore completing the writes of a save Orbax already gave up on (disk full): each
    callback finds Orbax's event loop closed and reports it as an unraisable exception."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(
        os.path.join("asyncio", "base_events.py"))


class _QuietFileHandler(logging.FileHandler):
    """A log file whose own write errors are dropped: it may sit on a disk that fills up, and
    logging's default prints a '--- Logging error ---' traceback for every record."""

    def handleError(self, record):  # logging's name
        del record


def orbax_log_path(workdir: str) -> str | None:
    """Where Orbax's log goes: TMPDIR/mlembed-orbax-<pid>.log, never onto the disk that holds
    the checkpoints (a full disk there would fail the log too). None (not written) when the
    temporary directory is on that disk."""
    tmp = tempfile.gettempdir()
    if not storage.is_url(workdir):
        with contextlib.suppress(OSError):
            if os.stat(tmp).st_dev == os.stat(workdir).st_dev:
                return None
    return os.path.join(tmp, f"mlembed-orbax-{os.getpid()}.log")


@contextlib.contextmanager
def orbax_log(path: str | None):
    """While active: Orbax's log records (and the closed-event-loop tracebacks a failed save
    leaves) go to `path` (if given), not to stderr."""
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_noise(unraisable.exc_type, unraisable.exc_value,
                                  unraisable.exc_traceback):
            previous_hook(unraisable)

    sys.unraisablehook = hook
    absl_logger = logging.getLogger("absl")
    quiet = _OrbaxLogFilter()
    handlers = list(absl_logger.handlers) + list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(quiet)
    file_handler = None
    if path:
        file_handler = _QuietFileHandler(path, delay=True)
        file_handler.setLevel(logging.WARNING)
        file_handler.addFilter(lambda r: not quiet.filter(r))
        absl_logger.addHandler(file_handler)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for h in handlers:
            h.removeFilter(quiet)
        if file_handler is not None:
            absl_logger.removeHandler(file_handler)
            file_handler.close()


class _TensorStoreTaskNoise(logging.Filter):
    """Orbax reads and writes tensors in concurrent asyncio tasks. When a damaged file or a
    full disk fails several of them, the first error is reported (one line) and asyncio
    would print every other one as '... exception was never retrieved' with a traceback,
    whenever the task or its gathering future is collected."""

    def filter(self, record):
        # "Task ..." or "_GatheringFuture exception was never retrieved" (a gather of them)
        if "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if "tensorstore" in str(exc).lower():
            return False
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None:  # a task of Orbax's own (e.g. a write that hit the disk limit)
            if "/orbax/" in tb.tb_frame.f_code.co_filename.replace(os.sep, "/"):
                return False
            tb = tb.tb_next
        return True


logging.getLogger("asyncio").addFilter(_TensorStoreTaskNoise())


def finished_steps(ckpt_dir: str) -> list[int]:
    """The steps of `ckpt_dir` whose save finished, ascending. Elsewhere an unfinished save is
    a temporary directory of another name; on gs:// Orbax writes the step in place and marks
    it finished with commit_success.txt last."""
    if not storage.isdir(ckpt_dir):
        return []
    steps = sorted(int(d) for d in storage.listdir(ckpt_dir) if d.isdigit())
    if ckpt_dir.startswith("gs://"):
        steps = [s for s in steps
                 if storage.isfile(os.path.join(ckpt_dir, str(s), _COMMIT_MARK))]
    return steps


def read_json_item(step_dir: str, item: str) -> dict:
    """A JSON item of a step directory (config, integrity); CheckpointDamaged if unreadable."""
    path = os.path.join(step_dir, item, "metadata")
    try:
        with storage.open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{item}/metadata is missing") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointDamaged(f"{item}/metadata is unreadable ({_reason(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged(f"{item}/metadata does not hold a JSON object")
    return data


def read_integrity(step_dir: str) -> Integrity | None:
    """The step's fingerprints, or None for a checkpoint saved before they were recorded."""
    if not storage.isdir(os.path.join(step_dir, "integrity")):
        return None
    try:
        return Integrity.from_json(read_json_item(step_dir, "integrity"))
    except ValueError as e:
        raise CheckpointDamaged(f"integrity/metadata: {e}") from None


def check_complete(step_dir: str) -> None:
    """CheckpointDamaged unless the step has its items and every process's data file."""
    for item in ("state", "data", "config"):
        if not storage.isdir(os.path.join(step_dir, item)):
            raise CheckpointDamaged(f"its {item}/ item is missing")
    found = [m for m in map(_DATA_FILE.match, storage.listdir(os.path.join(step_dir, "data")))
             if m]
    counts = {int(m.group(2)) for m in found}
    if len(counts) != 1:
        raise CheckpointDamaged("data/process_<i>-of-<n>.json is missing" if not counts else
                                f"data/ mixes files of {sorted(counts)} processes")
    n = counts.pop()
    missing = sorted(set(range(n)) - {int(m.group(1)) for m in found})
    if missing:
        raise CheckpointDamaged(f"data/process_{missing[0]}-of-{n}.json is missing")


def _state_metadata(step_dir: str):
    """The saved state's tree metadata (shapes and dtypes), read without the absl warning
    the Checkpointer wrapper prints for an item directory."""
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    except Exception as e:  # noqa: BLE001 - TensorStore/JSON errors of a damaged file
        raise CheckpointDamaged(f"state/ metadata is unreadable ({_reason(e)})") from None
    return meta.tree if hasattr(meta, "tree") else meta


def _shapes(tree) -> list[tuple]:
    leaves = jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)


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

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
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
        self.unverified: list[int] = []  # saved (or resumed from), no finite loss after yet

    # ------------------------------------------------------------------------- soundness
    def _read_sound(self) -> list[int]:
        if not storage.exists(self._sound_path):
            return []
        try:
            steps = json.loads(storage.read_text(self._sound_path))["sound"]
            return [int(s) for s in steps]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self._sound_path} is unreadable ({_reason(e)}); it lists "
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
                                          f"{_reason(e)}") from None

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
            integrity=ocp.args.JsonSave(Integrity(tensors, nonfinite_total).to_json(step)),
        )
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - the synchronous part: mkdir, host copies
            self._remove_partial()
            raise CheckpointSaveError(f"saving checkpoint {step} failed: {_reason(e)}; "
                                      f"{self.newest()} stays the newest checkpoint, which a "
                                      "rerun with the same --workdir resumes from") from None
        if saved:
            self._pending = step
            self.track(step)
        return saved

    def poll(self) -> None:
        """Cheap; raises CheckpointSaveError once the background save in flight has failed."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
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
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the background write raised
            self._remove_partial()
            where = f"checkpoint {step}" if step is not None else "a checkpoint"
            raise CheckpointSaveError(f"saving {where} failed: {_reason(e)}; the partial save "
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
            if _TMP_MARK in name:
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
        saved, wanted = _shapes(_state_metadata(step_dir)), _shapes(abstract_state)
        if saved != wanted:
            raise ConfigError(
                f"checkpoint {step_dir} holds a train state of another layout ({len(saved)} "
                f"tensors, this config makes {len(wanted)}; optimizer settings such as "
                "optim.mel_lr change it). Resume with the config it was saved with, or use a "
                "fresh --workdir.")
        integrity = read_integrity(step_dir)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.PyGrainCheckpointRestore(data_box)))
        except (RuntimeError, MemoryError):
            raise  # XLA or memory trouble of this machine, not of the files
        except Exception as e:  # noqa: BLE001 - TensorStore/grain errors of damaged files
            raise CheckpointDamaged(_reason(e)) from None
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


# Fields that change the parameter shapes; anything else (dtype of compute, remat, exits,
# attention kernel) may differ between the saving and the resuming run.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "mel", "mel_r_max", "param_dtype")


def check_same_model(saved: dict, current: dict, where: str, fields=SHAPE_FIELDS,
                     fix: str = "Resume with the config it was trained with, or use a fresh "
                     "--workdir.") -> None:
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
             for k in fields if json.dumps(saved.get(k)) != json.dumps(current.get(k))]
    if diffs:
        raise ConfigError(
            f"checkpoint {where} was saved by a different model ({'; '.join(diffs)}). {fix}")


def init_params_from(path: str, enc, config) -> tuple[dict, str]:
    """train.init_from -> (host params of the configured model, a line saying what they are).

    path: a Hugging Face Qwen3 directory (config.json + safetensors: imported, MEL factors by
    SVD of its token embedding), or a training workdir / WORKDIR/STEP /
    WORKDIR/checkpoints/STEP (its params exactly as trained, MEL factors included; the
    optimizer state and data position are not taken). Raises ConfigError when it is neither
    or holds another model shape.
    """
    if storage.isfile(os.path.join(path, "config.json")):
        from mlembed_jax.model.hf_import import load_hf_params  # reads safetensors only

        return (load_hf_params(path, enc, allow_fewer_layers=True),
                f"initialised from HF checkpoint {path}")
    try:
        reader = TrainedParams(path)
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_from={path!r} is neither a Hugging Face model directory "
                          f"(config.json + safetensors) nor a training checkpoint: {e}") from None
    where = f"{reader.workdir} step {reader.step}"
    # The dtype may differ (params are cast on placement); the shapes may not.
    check_same_model(reader.config.model.to_dict(), config.model.to_dict(), where,
                     fields=tuple(f for f in SHAPE_FIELDS if f != "param_dtype"),
                     fix="train.init_from needs a checkpoint of the configured model shape.")
    return reader.read_all(), (f"initialised from training checkpoint {where}: its params as "
                               "trained (MEL factors kept), a fresh optimizer state and data "
                               "order")


# Fields a resume may change freely: how the run is laid out, logged and evaluated, not what
# it trains. Any other change (optim, loss, data, schedule length, ...) needs
# --allow_config_change.
RESUME_FREE = ("mesh.", "model.remat", "model.attention", "data.prefetch", "train.log_every",
               "train.validation_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.max_nonfinite_steps", "train.divergence_factor",
               "train.divergence_window", "eval.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, config) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for every field that differs from a checkpoint's
    config. Fields the checkpoint does not know (added since) are not changes."""
    old, new = _flat(saved), _flat(config_json(config))
    return [(k, old[k], new[k]) for k in sorted(new)
            if k in old and json.dumps(old[k]) != json.dumps(new[k])]


def check_resume_changes(changes, allowed: bool, where: str) -> str | None:
    """The line listing the changes (None without any); ConfigError when one of them changes
    what the run trains and `allowed` (--allow_config_change) is not given."""
    if not changes:
        return None
    listed = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes)
    meaning = [k for k, _, _ in changes if not k.startswith(RESUME_FREE)]
    if meaning and not allowed:
        raise ConfigError(
            f"resuming {where} with a changed config: {listed}. "
            f"{', '.join(meaning)} {'changes' if len(meaning) == 1 else 'change'} what the run "
            "trains; pass --allow_config_change to resume with them anyway, or "
            "use a fresh --workdir")
    return f"resume: config differs from {where}: {listed}"


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """WORKDIR, WORKDIR/STEP or WORKDIR/checkpoints/STEP -> (checkpoints dir, step)."""
    storage.check_location(path, "checkpoint")
    path = storage.normalized(storage.absolute(path))
    head, tail = os.path.split(path)
    if tail.isdigit() and not storage.exists(path) \
            and storage.isdir(os.path.join(head, "checkpoints", tail)):
        path = os.path.join(head, "checkpoints", tail)  # WORKDIR/STEP
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    base = os.path.basename(path)
    if base.isdigit():
        step_dir = os.path.dirname(path)
        return step_dir, int(base)
    ckpt_dir = os.path.join(path, "checkpoints") if storage.isdir(
        os.path.join(path, "checkpoints")) else path
    steps = finished_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {path!r}: expected a training workdir "
                                "(with checkpoints/<step>) or a checkpoints/<step> directory")
    return ckpt_dir, steps[-1]


def load_trained(path: str):
    """(config, params as host numpy arrays, step) from a training workdir or step directory.

    Restores params only (no optimizer state) and nothing onto devices, so a tool can read a
    checkpoint without the mesh it was trained on. Every param is verified (TrainedParams).
    """
    source = TrainedParams(path)
    return source.config, source.read_all(), source.step


class TrainedParams:
    """The params of a saved training state, restored one leaf at a time and verified.

    For tools that stream a large model (tools/export_hf.py): `load_trained` restores every
    param at once, so writing its output would hold the model twice. Here `leaves` gives
    {path tuple: (shape, dtype)} from the checkpoint's metadata and `read(path)` restores just
    that one array as host numpy (an Orbax partial restore, no devices, no optimizer state).
    `config` is the saved run config (ConfigDict), `step` the checkpoint's step and `workdir`
    the training run directory it belongs to (where metrics.jsonl lives).

    Each array read is checked against the checkpoint's fingerprints and for NaN/inf; a
    checkpoint that fails (or whose files are missing or unreadable) raises
    CheckpointDamaged naming the step and the earlier steps that are intact. A checkpoint
    saved before fingerprints existed is only checked for NaN/inf, with a note on stderr.
    """

    def __init__(self, path: str, *, quiet: bool = False, name_intact: bool = True,
                 params_only: bool = False):
        """quiet: no note for an unverifiable checkpoint. name_intact: a damage error lists
        the intact earlier steps (reading them in full to find out). params_only: a step whose
        only damage is its data-iterator item still loads, with a note, when it has
        fingerprints (every param read is verified against them); see ToolParams."""
        self._name_intact = name_intact
        ckpt_dir, step = resolve_checkpoint(path)
        self.ckpt_dir, self.step = ckpt_dir, step
        self.step_dir = os.path.join(ckpt_dir, str(step))
        self.workdir = (os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints"
                        else ckpt_dir)
        self._state_dir = os.path.join(self.step_dir, "state")
        self.data_problem = None
        if params_only and storage.isdir(os.path.join(self.step_dir, "integrity")):
            self.data_problem = data_item_problem(self.step_dir)
        if not storage.isdir(os.path.join(self.step_dir, "config")):
            raise FileNotFoundError(f"{self.step_dir!r} is not a complete mlembed_jax "
                                    "checkpoint (no config item); was the save interrupted?")
        try:
            if self.data_problem is None:
                check_complete(self.step_dir)
            elif not storage.isdir(self._state_dir):
                raise CheckpointDamaged("its state/ item is missing")
            self.config = ml_collections.ConfigDict(read_json_item(self.step_dir, "config"))
            self.integrity = read_integrity(self.step_dir)
            tree = _state_metadata(self.step_dir)
        except CheckpointDamaged as e:
            raise self._damaged(str(e)) from None
        if self.data_problem is not None and not quiet:
            print(f"note: checkpoint {self.step_dir}: {self.data_problem}, so training cannot "
                  "resume from it; its params are verified against their fingerprints as they "
                  "are read", file=sys.stderr)
        if self.integrity is None and not quiet:
            print(f"note: checkpoint {self.step_dir} has no fingerprints (saved by an older "
                  "mlembed_jax): its values are checked for NaN/inf but cannot be verified "
                  "against what was saved", file=sys.stderr)
        flat = jax.tree_util.tree_flatten_with_path(
            tree["params"], is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
        self.leaves = {tuple(k.key for k in p): (tuple(m.shape), m.dtype) for p, m in flat}
        self._handler = ocp.PyTreeCheckpointHandler()

    def read_all(self) -> dict:
        """Every param as host numpy arrays, nested like the params."""
        params: dict = {}
        for leaf_path in self.leaves:
            node = params
            for key in leaf_path[:-1]:
                node = node.setdefault(key, {})
            node[leaf_path[-1]] = self.read(leaf_path)
        return params

    def read(self, path: tuple[str, ...]):
        """One param array (e.g. ("layers", "mlp", "up_proj")) as a host numpy array."""
        if path not in self.leaves:
            raise KeyError(f"checkpoint {self._state_dir!r} has no param {'/'.join(path)!r}; "
                           f"it has {sorted('/'.join(p) for p in self.leaves)}")
        shape, dtype = self.leaves[path]
        target = jax.ShapeDtypeStruct(shape, dtype)  # a shape only: nothing allocated twice
        for key in reversed(("params",) + path):
            target = {key: target}
        try:
            restored = self._handler.restore(epath.Path(self._state_dir),
                                             args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=jax.tree_util.tree_map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
                partial_restore=True))
        except (RuntimeError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - TensorStore errors of damaged files
            raise self._damaged(f"params/{'/'.join(path)} is unreadable ({_reason(e)})") \
                from None
        for key in ("params",) + path:
            restored = restored[key]
        name = "params/" + "/".join(path)
        saved = self.integrity.tensors if self.integrity else {}
        why = compare(saved, {name: host_fingerprint(restored)})
        if why:
            raise self._damaged(why)
        return restored

    def verify(self) -> None:
        """Reads every param once; CheckpointDamaged if any does not read back as saved."""
        for leaf_path in self.leaves:
            self.read(leaf_path)

    def _damaged(self, why: str) -> CheckpointDamaged:
        if not self._name_intact:
            return CheckpointDamaged(why)
        intact = intact_steps(self.ckpt_dir, below=self.step)
        hint = ("no earlier checkpoint is intact" if not intact else
                "intact earlier checkpoints: " + ", ".join(
                    os.path.join(self.ckpt_dir, str(s)) for s in intact)
                + "; pass one of them instead")
        return CheckpointDamaged(f"checkpoint {self.step_dir} (step {self.step}) is damaged: "
                                 f"{why}; {hint}")


def intact_steps(ckpt_dir: str, below: int) -> list[int]:
    """The steps under `below` in `ckpt_dir` whose params all read back as saved, newest
    first (each is read in full: only for error messages)."""
    out = []
    steps = [s for s in reversed(finished_steps(ckpt_dir)) if s < below]
    for step in steps:
        try:
            TrainedParams(os.path.join(ckpt_dir, str(step)), quiet=True,
                          name_intact=False).verify()
        except (CheckpointDamaged, FileNotFoundError, KeyError):
            continue
        out.append(step)
    return out


# ------------------------------------------------------------------ the tools' params reader

def data_item_problem(step_dir: str) -> str | None:
    """What is wrong with the step's data-iterator item alone (None when it is complete)."""
    try:
        check_complete(step_dir)
    except CheckpointDamaged as e:
        why = str(e)
        return why if "data" in why and "state/" not in why and "config/" not in why else None
    return None


class ToolParams(TrainedParams):
    """TrainedParams for the tools, which need the params alone (encode, export, eval, mining).

    A step whose only damage is its data-iterator item (the position training resumes from)
    still loads, with a note, when it has fingerprints: every param read is then verified
    against them, so what a tool gets is exactly what was saved. Training refuses such a step
    (it cannot resume the data order), as does anything without fingerprints.
    """

    def __init__(self, path: str, *, quiet: bool = False, name_intact: bool = True):
        super().__init__(path, quiet=quiet, name_intact=name_intact, params_only=True)


def load_params(path: str):
    """`load_trained` for the tools: (config, host params, step) through ToolParams."""
    source = ToolParams(path)
    return source.config, source.read_all(), source.step


def other_intact_steps(ckpt_dir: str, step: int, limit: int = 3) -> list[int]:
    """Up to `limit` steps of `ckpt_dir` other than `step` whose params are finite and read
    back as saved, nearest first (earlier steps before later ones at the same distance).
    Each candidate is read in full, so only error messages call this, and `limit` bounds
    the cost."""
    out = []
    others = sorted((s for s in finished_steps(ckpt_dir) if s != step),
                    key=lambda s: (abs(s - step), s > step))
    for s in others:
        if len(out) >= limit:
            break
        try:
            ToolParams(os.path.join(ckpt_dir, str(s)), quiet=True, name_intact=False).verify()
        except (CheckpointDamaged, FileNotFoundError, KeyError):
            continue
        out.append(s)
    return out


def alternatives_hint(ckpt_dir: str, step: int, flag: str) -> str:
    """'other checkpoints with intact params: DIR/4, DIR/2; pass one as --model' (or that
    there is none): the end of a tool's error about checkpoint `step`."""
    steps = other_intact_steps(ckpt_dir, step)
    if not steps:
        return f"no other checkpoint in {ckpt_dir} holds intact params"
    return ("other checkpoints with intact params: "
            + ", ".join(os.path.join(ckpt_dir, str(s)) for s in steps)
            + f"; pass one of them as {flag}")
