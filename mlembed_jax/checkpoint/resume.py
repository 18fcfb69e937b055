"""Resuming a run: the newest intact checkpoint, else train.init_from, else random
weights (`restore_or_init`), and which config changes a resume accepts
(`resume_changes`, `check_resume_changes`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from mlembed_jax.checkpoint.manager import Checkpointer, DataStateBox
from mlembed_jax.checkpoint.reader import init_params_from
from mlembed_jax.config import ConfigError, config_json
from mlembed_jax.model.qwen3 import EncoderConfig


@dataclasses.dataclass(frozen=True)
class ResumeOptions:
    """The command line's say in a resume, and where its lines go."""

    allow_config_change: bool = False  # --allow_config_change
    restart_from_scratch: bool = False  # --restart_from_scratch
    log: Callable[[str], None] = print
    lora: bool = False  # the state is LoRA adapters: train.init_from is their base, not state


def restore_or_init(ckpt: Checkpointer, config, abstract_state, init_fn, data_iter,
                    options: ResumeOptions = ResumeOptions()):
    """(state, nonfinite_total): the newest intact checkpoint, else train.init_from (an HF
    directory or another run's checkpoint), else random weights.

    abstract_state: the train state's ShapeDtypeStructs with the current mesh's shardings
    (a restore places every array by them). init_fn(host_params or None) -> a fresh sharded
    state. data_iter: the training iterator; a restore moves it to the saved position.
    nonfinite_total: the run's count of skipped non-finite steps so far (0 when fresh).
    A resumed checkpoint counts as unconfirmed until the first step's loss, computed with
    its params, is finite (Checkpointer.track).
    """
    log = options.log
    found = ckpt.restore_latest(abstract_state, config, DataStateBox, log,
                                options.restart_from_scratch)
    if found is not None:
        step, state, data_box, integrity = found
        note = check_resume_changes(resume_changes(ckpt.saved_config(step), config),
                                    options.allow_config_change, ckpt.step_dir(step))
        if note:
            log(note)
        data_iter.set_state(data_box.state)
        ckpt.track(step)  # its first step's loss shows whether it is sound
        log(f"resumed from {ckpt.step_dir(step)}")
        if integrity is None:
            log(f"note: checkpoint {step} has no fingerprints (saved by an older mlembed_jax): "
                "checked for NaN/inf only")
        return state, (integrity.nonfinite_total if integrity else 0)
    if options.lora:
        log("LoRA: fresh adapters (B = 0, so step 0 is the base model)")
        return init_fn(None), 0
    if config.train.init_from:
        enc = EncoderConfig.from_config(config.model)
        host, what = init_params_from(config.train.init_from, enc, config)
        state = init_fn(host)
        del host
        log(what)
        return state, 0
    log("initialised from scratch (random weights)")
    return init_fn(None), 0


# Fields a resume may change freely: how the run is laid out, logged and evaluated, not what
# it trains. Any other change (optim, loss, data, schedule length, ...) needs
# --allow_config_change.
RESUME_FREE = ("mesh.", "model.remat", "model.attention", "data.prefetch", "train.log_every",
               "train.validation_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.eval_every",  # validation_every's old name, in older checkpoints' configs
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
