"""What a LoRA training run adds to the loop: the frozen base, loaded once from
train.init_from, placed by the step's base shardings, and fingerprinted for the checkpoints
from the same read.

The train and eval steps take `base.params` as their last argument; the retrieval evaluator
embeds with `base.merge(adapters)`, the merged weights an export writes (a transient
weight-sized copy while it runs). The divergence rule and train/param_norm read the norm of
the adapters, the only params that change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from mlembed_jax import storage
from mlembed_jax.checkpoint.reader import lora_base_from
from mlembed_jax.config import ConfigError
from mlembed_jax.model.lora import merge_adapters


@dataclasses.dataclass
class LoraBase:
    params: Any  # the base params, placed by BuiltStep.base_shardings
    record: dict  # {"path", "fingerprint"}: saved with every checkpoint
    merge: Callable  # adapters -> merged params (the base's shardings)


def load_base(config, step_fns, log: Callable[[str], None]) -> LoraBase | None:
    """The LoRA base of a run (None with LoRA off): train.init_from's params, placed.
    ConfigError without train.init_from: adapters on random weights would train nothing
    worth keeping, and the base could not be found again to resume or export."""
    lcfg = step_fns.setup.lora
    if lcfg is None:
        return None
    path = str(config.train.init_from or "")
    if not path:
        raise ConfigError("model.lora.rank > 0 needs train.init_from: the base model the "
                          "adapters train on (a Hugging Face directory or a training workdir)")
    # One read of the base gives both the params and the fingerprint. ConfigError if unusable.
    host, fingerprint = lora_base_from(path, step_fns.setup.enc, config)
    record = {"path": storage.absolute(path), "fingerprint": fingerprint}
    params = step_fns.place_base(host)
    del host
    trained = sum(x.size for x in jax.tree_util.tree_leaves(step_fns.abstract_state.params))
    log(f"LoRA: frozen base {record['path']} (fingerprint {record['fingerprint']}); rank "
        f"{lcfg.rank}, alpha {lcfg.alpha:g}, targets {','.join(lcfg.targets)}: {trained:,} "
        "trained parameters")
    # The base as an argument, not a closure: a captured array would be baked into the HLO.
    merged = jax.jit(lambda base, ad: merge_adapters(base, ad, lcfg),
                     out_shardings=step_fns.base_shardings)
    return LoraBase(params=params, record=record, merge=lambda ad: merged(params, ad))
