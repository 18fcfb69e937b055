"""The one table between HF Qwen3 tensor names and our param paths, usable both ways.

HF linear weights are [out, in]; ours are [in, out] with attention heads split out. Layer
tensors `layers.{i}.X` map to slice i of our stacked `layers/X` arrays.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class NameRule:
    hf: str  # HF name, with {i} for the layer index
    ours: tuple[str, ...]  # path in our param tree
    kind: str  # "copy" | "linear" | "q_heads" | "kv_heads" | "o_heads"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


RULES = (
    NameRule("embed_tokens.weight", ("embed_tokens", "embedding"), "copy"),
    NameRule("norm.weight", ("norm", "scale"), "copy"),
    NameRule("layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), "copy"),
    NameRule("layers.{i}.post_attention_layernorm.weight",
             ("layers", "post_attention_layernorm", "scale"), "copy"),
    NameRule("layers.{i}.self_attn.q_norm.weight", ("layers", "self_attn", "q_norm", "scale"),
             "copy"),
    NameRule("layers.{i}.self_attn.k_norm.weight", ("layers", "self_attn", "k_norm", "scale"),
             "copy"),
    NameRule("layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj"), "q_heads"),
    NameRule("layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj"), "kv_heads"),
    NameRule("layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj"), "kv_heads"),
    NameRule("layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj"), "o_heads"),
    NameRule("layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), "linear"),
    NameRule("layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj"), "linear"),
    NameRule("layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj"), "linear"),
)

# Names a checkpoint may carry that an embedding encoder does not use.
IGNORED = ("lm_head.weight",)

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def strip_prefix(name: str) -> str:
    """Qwen3ForCausalLM saves `model.layers...`, Qwen3Model saves `layers...`."""
    return name[len("model."):] if name.startswith("model.") else name


def match(name: str) -> tuple[NameRule, int | None] | None:
    """HF name (prefix stripped) -> (rule, layer index or None), or None if unknown."""
    m = _LAYER_RE.match(name)
    if m:
        key = "layers.{i}." + m.group(2)
        layer = int(m.group(1))
    else:
        key, layer = name, None
    for rule in RULES:
        if rule.hf == key:
            return rule, layer
    return None


def hf_shape(rule: NameRule, cfg) -> tuple[int, ...]:
    """The HF tensor shape this rule expects for an EncoderConfig."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, kv = cfg.num_heads, cfg.num_kv_heads
    return {
        "embed_tokens.weight": (cfg.vocab_size, d),
        "norm.weight": (d,),
        "layers.{i}.input_layernorm.weight": (d,),
        "layers.{i}.post_attention_layernorm.weight": (d,),
        "layers.{i}.self_attn.q_norm.weight": (hd,),
        "layers.{i}.self_attn.k_norm.weight": (hd,),
        "layers.{i}.self_attn.q_proj.weight": (h * hd, d),
        "layers.{i}.self_attn.k_proj.weight": (kv * hd, d),
        "layers.{i}.self_attn.v_proj.weight": (kv * hd, d),
        "layers.{i}.self_attn.o_proj.weight": (d, h * hd),
        "layers.{i}.mlp.gate_proj.weight": (f, d),
        "layers.{i}.mlp.up_proj.weight": (f, d),
        "layers.{i}.mlp.down_proj.weight": (d, f),
    }[rule.hf]


def to_ours(rule: NameRule, x: np.ndarray, cfg) -> np.ndarray:
    """One HF tensor -> our layout (for one layer, if per-layer)."""
    hd = cfg.head_dim
    if rule.kind == "copy":
        return x
    if rule.kind == "linear":
        return x.T
    if rule.kind in ("q_heads", "kv_heads"):  # [heads*hd, d] -> [d, heads, hd]
        return x.T.reshape(x.shape[1], x.shape[0] // hd, hd)
    if rule.kind == "o_heads":  # [d, heads*hd] -> [heads, hd, d]
        return x.T.reshape(x.shape[1] // hd, hd, x.shape[0])
    raise ValueError(rule.kind)


def to_hf(rule: NameRule, x: np.ndarray) -> np.ndarray:
    """Our layout (one layer's slice) -> the HF tensor; exact inverse of `to_ours`."""
    if rule.kind == "copy":
        return x
    if rule.kind == "linear":
        return x.T
    if rule.kind in ("q_heads", "kv_heads"):  # [d, heads, hd] -> [heads*hd, d]
        return x.reshape(x.shape[0], -1).T
    if rule.kind == "o_heads":  # [heads, hd, d] -> [d, heads*hd]
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(rule.kind)


def expected_hf_names(cfg) -> list[str]:
    names = []
    for rule in RULES:
        if rule.per_layer:
            names += [rule.hf.format(i=i) for i in range(cfg.num_layers)]
        else:
            names.append(rule.hf)
    return names
