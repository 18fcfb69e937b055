"""Reading saved checkpoints without training: resolving a path to a step, listing the
finished and intact steps, the saved config and fingerprints, and each param restored to
host numpy and verified (`TrainedParams`, `ToolParams`, `load_trained`, `load_params`).

Nothing here touches devices, the optimizer state or global logging, so tools (encode,
export, eval, mining) import this module alone.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mlembed_jax import storage
from mlembed_jax.checkpoint.lora_base import (
    adapted_leaf,
    checkpoint_digest,
    digest,
    lora_settings,
    merge_leaf,
    source_fingerprint,
)
from mlembed_jax.checkpoint.orbax_logs import quiet_task_noise
from mlembed_jax.checkpoint.verify import (
    CheckpointDamaged,
    CheckpointError,
    Integrity,
    compare,
    host_fingerprint,
)
from mlembed_jax.config import ConfigError

__all__ = ["CheckpointDamaged", "CheckpointError", "TrainedParams", "ToolParams",
           "alternatives_hint", "check_same_model", "finished_steps", "init_params_from",
           "intact_steps", "load_params", "load_trained", "lora_base_from", "other_intact_steps",
           "resolve_checkpoint"]

ITEMS = ("state", "data", "config", "integrity")
DAMAGED_DIR = "damaged_checkpoints"  # under the workdir: checkpoints set aside, never deleted
UNSOUND_DIR = "unsound_checkpoints"  # under the workdir: saved, then never shown sound
SOUND_FILE = "sound_checkpoints.json"  # under the workdir: steps a later finite loss confirmed
TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_MARK = "commit_success.txt"
_DATA_FILE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


def reason(e: BaseException) -> str:
    """One line from an exception. TensorStore nests its causes left to right ("Error
    writing ...: Failed writing ...: File too large"), with the spec as a JSON blob: keep
    the head and the innermost cause."""
    text = " ".join(re.sub(r"\[(tensorstore_spec|source locations)='.*?'\]", "",
                           str(e)).split()) or type(e).__name__
    if len(text) <= 240:
        return text
    return f"{text[:100]} ... {text[-130:]}"


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
        raise CheckpointDamaged(f"{item}/metadata is unreadable ({reason(e)})") from None
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


def state_metadata(step_dir: str):
    """The saved state's tree metadata (shapes and dtypes), read without the absl warning
    the Checkpointer wrapper prints for an item directory."""
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    except Exception as e:  # noqa: BLE001 - TensorStore/JSON errors of a damaged file
        raise CheckpointDamaged(f"state/ metadata is unreadable ({reason(e)})") from None
    return meta.tree if hasattr(meta, "tree") else meta


def shapes(tree) -> list[tuple]:
    leaves = jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)

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
    params, what, _ = _import(path, enc, config)
    return params, what


def lora_base_from(path: str, enc, config) -> tuple[dict, str]:
    """(host params, fingerprint) of a LoRA base: `init_params_from`'s params and
    lora_base.source_fingerprint's value, from one read of the base (an HF directory's
    tensors are checksummed as the import reads them)."""
    figures: dict = {}
    params, _, reader = _import(
        path, enc, config, on_read=lambda name, x: figures.__setitem__(name, host_fingerprint(x)))
    return params, (digest(figures) if reader is None else checkpoint_digest(reader))


def _import(path: str, enc, config, on_read=None):
    """init_params_from's (params, line), and the TrainedParams read (None for an HF base).
    on_read: hf_import.load_hf_params's."""
    if storage.isfile(os.path.join(path, "config.json")):
        from mlembed_jax.model.hf_import import load_hf_params  # reads safetensors only

        return (load_hf_params(path, enc, allow_fewer_layers=True, on_read=on_read),
                f"initialised from HF checkpoint {path}", None)
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
                               "order"), reader

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
        quiet_task_noise()  # a damaged file fails several concurrent reads at once
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
            tree = state_metadata(self.step_dir)
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
        self._saved_leaves = self.leaves
        self._handler = ocp.PyTreeCheckpointHandler()
        self.read_figures: dict = {}  # "params/..." -> host_fingerprint of what was read
        # LoRA: the saved params are adapters; `leaves` and `read` give the merged model.
        self.lora = lora_settings(self.config.model)
        self.merge = True  # False: `read` gives the base's params as they are (a PEFT export)
        self.base = None
        if self.lora is not None:
            self.base = self._read_base()
            self.leaves = {tuple(k.key for k in p): (tuple(x.shape), x.dtype)
                           for p, x in jax.tree_util.tree_flatten_with_path(self.base)[0]}

    def _read_base(self) -> dict:
        """A LoRA checkpoint's base (host params in model.param_dtype), read from the path
        the run recorded and checked against the recorded fingerprint."""
        from mlembed_jax.model.qwen3 import EncoderConfig  # the model only for a LoRA base

        record = (self.integrity.lora_base if self.integrity else None) or {}
        path = record.get("path")
        if not path:
            raise CheckpointError(f"checkpoint {self.step_dir} holds LoRA adapters but no "
                                  "record of their base (integrity/lora_base); it cannot be used")
        enc = EncoderConfig.from_config(self.config.model)

        def unreadable(e):
            return CheckpointError(f"checkpoint {self.step_dir} holds LoRA adapters of the "
                                   f"base {path}, which cannot be read ({reason(e)}); put the "
                                   "base back at that path")

        def changed(found):
            return CheckpointError(
                f"checkpoint {self.step_dir} holds LoRA adapters of the base {path} with "
                f"fingerprint {record['fingerprint']}, but {path} now has fingerprint {found} "
                "(it changed since training); put the base it was trained on back at that path")

        try:
            host, found = lora_base_from(path, enc, self.config)
        except (ConfigError, OSError, ValueError) as e:
            try:  # a base that no longer imports (another shape) may just have been replaced
                found = source_fingerprint(path)
            except (ConfigError, OSError, ValueError):
                raise unreadable(e) from None
            raise (changed(found) if found != record["fingerprint"] else unreadable(e)) from None
        if found != record["fingerprint"]:
            raise changed(found)
        dtype = np.dtype(jax.numpy.dtype(enc.param_dtype))  # as training placed it
        return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype, copy=False), host)

    def read_all(self) -> dict:
        """Every param as host numpy arrays, nested like the params."""
        from flax import traverse_util  # on use: the tools import this module for one param

        return traverse_util.unflatten_dict({p: self.read(p) for p in self.leaves})

    def read(self, path: tuple[str, ...]):
        """One param array (e.g. ("layers", "mlp", "up_proj")) as a host numpy array; of a
        LoRA checkpoint, the base's with the adapters merged (W + alpha / r A @ B)."""
        if self.lora is None:
            return self._read_saved(path)
        if path not in self.leaves:
            raise KeyError(f"the LoRA base of {self.step_dir!r} has no param {'/'.join(path)!r}")
        w = self.base
        for key in path:
            w = w[key]
        hit = adapted_leaf(path, self.lora[2])
        if not self.merge or hit is None:
            return w
        a, b = (self._read_saved(("layers", *hit, k)) for k in ("A", "B"))
        return merge_leaf(w, a, b, self.lora[1] / self.lora[0])

    def read_adapters(self) -> dict:
        """A LoRA checkpoint's adapters as saved: {"layers": {module: {target: {"A", "B"}}}}."""
        from flax import traverse_util

        return traverse_util.unflatten_dict({p: self._read_saved(p) for p in self._saved_leaves})

    def _read_saved(self, path: tuple[str, ...]):
        if path not in self._saved_leaves:
            raise KeyError(f"checkpoint {self._state_dir!r} has no param {'/'.join(path)!r}; "
                           f"it has {sorted('/'.join(p) for p in self._saved_leaves)}")
        shape, dtype = self._saved_leaves[path]
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
            raise self._damaged(f"params/{'/'.join(path)} is unreadable ({reason(e)})") \
                from None
        for key in ("params",) + path:
            restored = restored[key]
        name = "params/" + "/".join(path)
        saved = self.integrity.tensors if self.integrity else {}
        figures = host_fingerprint(restored)
        why = compare(saved, {name: figures})
        if why:
            raise self._damaged(why)
        self.read_figures[name] = figures
        return restored

    def verify(self) -> None:
        """Reads every param once; CheckpointDamaged if any does not read back as saved."""
        for leaf_path in self._saved_leaves:
            self._read_saved(leaf_path)

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
