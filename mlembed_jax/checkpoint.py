"""Orbax checkpoints of a run: train state, data-iterator state and config, saved together.

Items of a step directory: `state` (params, optimizer state, step, rng), `data` (each
process's iterator position as `process_<i>-of-<n>.json`, written by grain's handler from a
`DataStateBox`) and `config` (the run config as JSON). Saves are asynchronous. Restores go
through an abstract target carrying the *current* mesh's shardings, so a run resumes on
another mesh or device count. A checkpoint of another model shape is caught by comparing the
saved config first, with one clear error.
"""

from __future__ import annotations

import json
import os

import grain.python as grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mlembed_jax.config import ConfigError


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


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


class Checkpointer:
    """Wraps an orbax CheckpointManager at `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_box, config, force: bool = False) -> bool:
        """Starts an async save; `data_box` is a DataStateBox snapshot of this process."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.PyGrainCheckpointSave(data_box),
            config=ocp.args.JsonSave(_json_safe(config.to_dict())),
        )
        return self.manager.save(step, args=args, force=force)

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state, config, data_box):
        """(state, data_box) of `step`, placed by the shardings in `abstract_state`."""
        check_same_model(self.saved_config(step)["model"], config.model.to_dict(),
                         f"{self.directory}/{step}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.PyGrainCheckpointRestore(data_box)))
        return out["state"], out["data"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


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
    if os.path.isfile(os.path.join(path, "config.json")):
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


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """WORKDIR, WORKDIR/STEP or WORKDIR/checkpoints/STEP -> (checkpoints dir, step)."""
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    if tail.isdigit() and not os.path.exists(path) \
            and os.path.isdir(os.path.join(head, "checkpoints", tail)):
        path = os.path.join(head, "checkpoints", tail)  # WORKDIR/STEP
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    base = os.path.basename(path)
    if base.isdigit():
        step_dir = os.path.dirname(path)
        return step_dir, int(base)
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) \
        if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {path!r}: expected a training workdir "
                                "(with checkpoints/<step>) or a checkpoints/<step> directory")
    return ckpt_dir, steps[-1]


def load_trained(path: str):
    """(config, params as host numpy arrays, step) from a training workdir or step directory.

    Restores params only (no optimizer state) and nothing onto devices, so a tool can read a
    checkpoint without the mesh it was trained on.
    """
    source = TrainedParams(path)
    return source.config, source.read_all(), source.step


class TrainedParams:
    """The params of a saved training state, restored one leaf at a time.

    For tools that stream a large model (tools/export_hf.py): `load_trained` restores every
    param at once, so writing its output would hold the model twice. Here `leaves` gives
    {path tuple: (shape, dtype)} from the checkpoint's metadata and `read(path)` restores just
    that one array as host numpy (an Orbax partial restore, no devices, no optimizer state).
    `config` is the saved run config (ConfigDict), `step` the checkpoint's step and `workdir`
    the training run directory it belongs to (where metrics.jsonl lives).
    """

    def __init__(self, path: str):
        ckpt_dir, step = resolve_checkpoint(path)
        step_dir = os.path.join(ckpt_dir, str(step))
        config_path = os.path.join(step_dir, "config", "metadata")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{step_dir!r} is not a complete mlembed_jax checkpoint (no "
                                    "config item); was the save interrupted?")
        with open(config_path) as f:
            self.config = ml_collections.ConfigDict(json.load(f))
        self.step = step
        self.workdir = (os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints"
                        else ckpt_dir)
        self._state_dir = os.path.join(step_dir, "state")
        self._checkpointer = ocp.PyTreeCheckpointer()
        meta = self._checkpointer.metadata(self._state_dir)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        flat = jax.tree_util.tree_flatten_with_path(
            tree["params"], is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
        self.leaves = {tuple(k.key for k in p): (tuple(m.shape), m.dtype) for p, m in flat}

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
        restored = self._checkpointer.restore(self._state_dir, args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
            partial_restore=True))
        for key in ("params",) + path:
            restored = restored[key]
        return restored
