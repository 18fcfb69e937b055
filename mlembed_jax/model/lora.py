"""LoRA: low-rank adapters on the attention and MLP projections, base weights frozen.

Mechanics: our own few functions, not a library. qwix's LoRA provider (and Flax's LoRA
modules) were considered: qwix intercepts dot_general and finds the weight by walking the
tracer back to a module param, but our `qwen3.matmul` contracts a reshaped 2-D view of every
kernel, so its adapters would take the flat [in, out] shape and lose the heads / kv_heads
logical axes the sharding rules place; it also creates the adapters inside the base's
`params` collection, which the step would have to split again to keep the base out of the
optimizer state. Flax's LoRA modules would replace our projections (new param names, no HF
names). Here the adapters are a separate pytree, passed to the model as its own `lora`
variable collection and sliced per layer by the same `nn.scan` as the weights. Each adapted
projection computes x @ W + x @ A @ (alpha / r) B inside the scan body (`qwen3._linear`),
as peft does. Adding A @ B to W instead would, per layer, form a weight-sized delta, keep
the adapted weight as a backward residual (a second copy of the weights without remat,
and under the "dots" policy) and compute the weight gradient x^T dy only to project it
onto A and B. On the activation side the extra work is r (in + out) multiply-adds per
token and projection against in x out: 0.6% of the seven projections' at Qwen3-8B's shapes
with r = 16. `merge_adapters` folds W + (alpha / r) A @ B once, for export.

Layout, for a kernel W [layers, *in, *out] (as stored: [in, out], heads as their own axes):
A [layers, *in, r] (peft's default init: uniform in +-1/sqrt(fan_in)), B [layers, r, *out]
(zeros, so step 0 is exactly the base). The adapters' logical axes are the weight's, with
"lora_rank" (unmapped by the rules table: replicated) for r, so FSDP / tensor sharding of
the adapters follows the weights they adapt.

MEL: the embedding factors U, V are part of the frozen base. LoRA's point is that the
optimizer state holds only the small adapters and the base is never written; training the
factors would put a [vocab, r_max] pair (and its Adam moments) back into the state. peft
likewise leaves embed_tokens alone unless asked. The MEL rank is still sampled per step, so
the adapters learn under every embedding rank the model will be truncated to.

Dropout on the adapter input is not implemented: config refuses model.lora.dropout != 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mlembed_jax.model.encoder import truncate_params
from mlembed_jax.model.qwen3 import Qwen3Encoder

# target name -> (module under layers/, number of input axes of its kernel after `layers`)
TARGETS = {
    "q_proj": ("self_attn", 1), "k_proj": ("self_attn", 1), "v_proj": ("self_attn", 1),
    "o_proj": ("self_attn", 2),
    "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1),
}
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """model.lora, on: rank r >= 1, scale alpha / r, the adapted projections."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    dropout: float = 0.0

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if self.rank < 1 or not self.targets or unknown or self.dropout != 0:
            raise ValueError(f"LoraConfig needs rank >= 1, targets among {tuple(TARGETS)} "
                             f"and dropout 0 (not implemented); got {self}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, model_cfg) -> "LoraConfig | None":
        """model.lora as a LoraConfig; None when LoRA is off (rank 0 or no block)."""
        lora = model_cfg.get("lora") if hasattr(model_cfg, "get") else None
        if lora is None or int(lora.rank) == 0:
            return None
        return cls(rank=int(lora.rank), alpha=float(lora.alpha),
                   targets=tuple(lora.targets), dropout=float(lora.dropout))


def _targets(tree, lora_cfg: LoraConfig):
    """(target, module, input axes, node of `tree` at layers/module/target) per target."""
    for t in lora_cfg.targets:
        module, n_in = TARGETS[t]
        yield t, module, n_in, tree["layers"][module][t]


def init_adapters(params, lora_cfg: LoraConfig, rng: jax.Array):
    """Fresh adapters for `params` (arrays or ShapeDtypeStructs; only shapes are read).

    Returns {"layers": {module: {target: {"A": [L, *in, r], "B": [L, r, *out]}}}}, fp32.
    """
    out: dict = {"layers": {}}
    keys = jax.random.split(rng, len(lora_cfg.targets))
    for key, (t, module, n_in, w) in zip(keys, _targets(params, lora_cfg)):
        layers, ins, outs = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
        bound = 1.0 / math.sqrt(math.prod(ins))  # peft: kaiming_uniform_(a=sqrt(5))
        a = jax.random.uniform(key, (layers, *ins, lora_cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((layers, lora_cfg.rank, *outs), jnp.float32)
        out["layers"].setdefault(module, {})[t] = {"A": a, "B": b}
    return out


def adapter_logical_axes(param_axes, lora_cfg: LoraConfig):
    """The adapters' PartitionSpecs of logical axes, from the params' (encoder.
    param_logical_axes): A keeps the weight's layer and input axes, B its layer and output
    axes; r is "lora_rank"."""
    out: dict = {"layers": {}}
    for t, module, n_in, spec in _targets(param_axes, lora_cfg):
        spec = tuple(spec)
        out["layers"].setdefault(module, {})[t] = {
            "A": PartitionSpec(*spec[:1 + n_in], RANK_AXIS),
            "B": PartitionSpec(spec[0], RANK_AXIS, *spec[1 + n_in:])}
    return out


def scaled(adapters, lora_cfg: LoraConfig):
    """The model's `lora` collection: B pre-multiplied by alpha / r, so each projection
    adds A @ B. (The multiply is on the small B only, and differentiable.)"""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * lora_cfg.scale if getattr(path[-1], "key", None) == "B" else x,
        adapters)


def _stacked_delta(a, b):
    """A [L, *in, r] @ B [L, r, *out] -> [L, *in, *out]."""
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)


def merge_adapters(params, adapters, lora_cfg: LoraConfig):
    """Params with every adapted kernel replaced by W + (alpha / r) A @ B (computed in fp32,
    stored in W's dtype): the forward of the merged params is the adapted forward."""
    out = jax.tree_util.tree_map(lambda x: x, params)  # new dicts, same leaves
    for t, module, _, ad in _targets(adapters, lora_cfg):
        w = params["layers"][module][t]
        d = _stacked_delta(ad["A"].astype(jnp.float32), ad["B"].astype(jnp.float32))
        out["layers"][module][t] = (w.astype(jnp.float32) + lora_cfg.scale * d).astype(w.dtype)
    return out


def encode(base, adapters, lora_cfg: LoraConfig, cfg, tokens, segment_ids, positions,
           pool_index, *, rank=None, num_layers: int | None = None,
           return_hidden: bool = False):
    """encoder.encode with adapters: the same inputs and outputs (see Qwen3Encoder). The
    base stays frozen when only `adapters` is differentiated (as train_step does)."""
    if num_layers is not None and num_layers != cfg.num_layers:
        cfg = cfg.truncated(num_layers)
        base = truncate_params(base, num_layers)
        adapters = truncate_params(adapters, num_layers)
    module = Qwen3Encoder(cfg, return_hidden=return_hidden)
    return module.apply({"params": base, "lora": scaled(adapters, lora_cfg)}, tokens,
                        segment_ids, positions, pool_index, rank)
