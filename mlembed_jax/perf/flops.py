"""FLOPs of a train step, counted by hand (XLA's cost analysis counts a scanned body once),
and the one table of accelerators (HBM and peak FLOP/s) that MFU and the AOT report use.

Per real token: 6 * N_non_embedding (forward 2N, backward 4N: the activation and the weight
gradients). With LoRA (model.lora) the base is frozen, so its weight gradients are never
formed: 4 N for the base (forward 2N, activation gradients 2N) plus 6 A for the A adapter
params (x A and (x A) B forward, both gradients of each backward). Per text of n tokens,
causal attention adds per layer QK^T and PV over the n(n+1)/2 visible pairs: 2 matmuls x 2
FLOPs x n(n+1)/2 x heads x head_dim forward, times 3 for forward + backward (it has no
weights: LoRA or not, its backward is the same).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator: HBM per chip (decimal bytes) and dense bf16 peak FLOP/s (datasheets).

    name: what tools/aot_compile.py's --topology calls it. kinds: substrings of
    jax's device_kind that identify it (the longest matching one wins)."""

    name: str
    platform: str  # "tpu" or "gpu"
    kinds: tuple[str, ...]
    hbm_bytes: float
    peak_flops: float


CHIPS = (
    Chip("h200", "gpu", ("H200",), 141e9, 989e12),
    Chip("h100", "gpu", ("H100",), 80e9, 989e12),
    Chip("a100", "gpu", ("A100",), 80e9, 312e12),
    Chip("v4", "tpu", ("TPU v4",), 32e9, 275e12),
    Chip("v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 16e9, 197e12),
    Chip("v5litepod", "tpu", (), 16e9, 197e12),  # gcloud's name for v5e slices
    Chip("v5p", "tpu", ("TPU v5p", "TPU v5"), 95e9, 459e12),  # a v5p reports plain "TPU v5"
    Chip("v6e", "tpu", ("TPU v6",), 32e9, 918e12),
)
CHIPS_BY_NAME = {c.name: c for c in CHIPS}


def chip_of(device_kind: str) -> Chip | None:
    """The chip a jax device_kind names, or None (a CPU, an unlisted accelerator)."""
    best, best_len = None, 0
    for chip in CHIPS:
        for kind in chip.kinds:
            if kind.lower() in device_kind.lower() and len(kind) > best_len:
                best, best_len = chip, len(kind)
    return best


def non_embedding_params(model_cfg) -> int:
    """Parameters excluding the token embedding (attention, MLP, norms, final norm)."""
    d, f, hd = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.head_dim
    h, kv, L = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.num_layers
    attn = d * h * hd * 2 + d * kv * hd * 2 + 2 * hd
    return L * (attn + 3 * d * f + 2 * d) + d


# model.lora.targets -> (input width, output width) of the projection, per layer.
_LORA_SHAPES = {
    "q_proj": lambda m: (m.hidden_size, m.num_heads * m.head_dim),
    "k_proj": lambda m: (m.hidden_size, m.num_kv_heads * m.head_dim),
    "v_proj": lambda m: (m.hidden_size, m.num_kv_heads * m.head_dim),
    "o_proj": lambda m: (m.num_heads * m.head_dim, m.hidden_size),
    "gate_proj": lambda m: (m.hidden_size, m.intermediate_size),
    "up_proj": lambda m: (m.hidden_size, m.intermediate_size),
    "down_proj": lambda m: (m.intermediate_size, m.hidden_size),
}


def lora_params(model_cfg) -> int:
    """Adapter parameters of model.lora (0 with LoRA off): r x (in + out) per adapted
    projection and layer."""
    lora = getattr(model_cfg, "lora", None)
    rank = int(getattr(lora, "rank", 0) or 0) if lora is not None else 0
    if rank == 0:
        return 0
    return model_cfg.num_layers * rank * sum(
        sum(_LORA_SHAPES[t](model_cfg)) for t in lora.targets)


def train_flops(model_cfg, text_lengths: Iterable[int], lora: bool = True) -> float:
    """FLOPs of forward + backward over texts of the given lengths (real tokens only):
    6 N per token, or with model.lora 4 N + 6 A (module docstring). lora=False: the whole
    model trained, whatever model.lora says (the torch reference of tools/benchmark.py)."""
    lengths = list(text_lengths)
    adapters = lora_params(model_cfg) if lora else 0
    per_token = (4.0 * non_embedding_params(model_cfg) + 6.0 * adapters if adapters
                 else 6.0 * non_embedding_params(model_cfg))
    dense = per_token * sum(lengths)
    return dense + model_cfg.num_layers * attention_flops(model_cfg.num_heads,
                                                          model_cfg.head_dim, lengths)


def attention_flops(num_heads: int, head_dim: int, text_lengths: Iterable[int]) -> float:
    """Forward + backward FLOPs of one causal attention layer over texts of these lengths."""
    per_pair = 3 * 2 * 2 * num_heads * head_dim
    return per_pair * sum(n * (n + 1) / 2 for n in text_lengths)


def peak_flops(device_kind: str) -> float | None:
    chip = chip_of(device_kind)
    return chip.peak_flops if chip else None


def mfu(flops: float, seconds: float, device_kind: str, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: `flops` done in `seconds` on `devices` chips of this kind,
    against their dense bf16 peak; None for a chip not in CHIPS."""
    peak = peak_flops(device_kind)
    return flops / seconds / (peak * devices) if peak else None
