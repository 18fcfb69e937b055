"""FLOPs of a train step, counted by hand (XLA's cost analysis counts a scanned body once).

Per real token: 6 * N_non_embedding (forward 2N, backward 4N). Per text of n tokens, causal
attention adds per layer QK^T and PV over the n(n+1)/2 visible pairs: 2 matmuls x 2 FLOPs x
n(n+1)/2 x heads x head_dim forward, times 3 for forward + backward.
"""

from __future__ import annotations

from typing import Iterable

# Dense bf16 peak FLOP/s per chip, by device_kind substring (vendor datasheets).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # a v5p reports its kind as plain "TPU v5"
    "TPU v6": 918e12,
    "TPU v4": 275e12,
}


def non_embedding_params(model_cfg) -> int:
    """Parameters excluding the token embedding (attention, MLP, norms, final norm)."""
    d, f, hd = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.head_dim
    h, kv, L = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.num_layers
    attn = d * h * hd * 2 + d * kv * hd * 2 + 2 * hd
    return L * (attn + 3 * d * f + 2 * d) + d


def train_flops(model_cfg, text_lengths: Iterable[int]) -> float:
    """FLOPs of forward + backward over texts of the given lengths (real tokens only)."""
    lengths = list(text_lengths)
    dense = 6.0 * non_embedding_params(model_cfg) * sum(lengths)
    return dense + model_cfg.num_layers * attention_flops(model_cfg.num_heads,
                                                          model_cfg.head_dim, lengths)


def attention_flops(num_heads: int, head_dim: int, text_lengths: Iterable[int]) -> float:
    """Forward + backward FLOPs of one causal attention layer over texts of these lengths."""
    per_pair = 3 * 2 * 2 * num_heads * head_dim
    return per_pair * sum(n * (n + 1) / 2 for n in text_lengths)


def peak_flops(device_kind: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(flops: float, seconds: float, device_kind: str, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: `flops` done in `seconds` on `devices` chips of this kind,
    against their dense bf16 peak; None for a chip not in PEAK_FLOPS."""
    peak = peak_flops(device_kind)
    return flops / seconds / (peak * devices) if peak else None
