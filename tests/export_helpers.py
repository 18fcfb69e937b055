"""Shared pieces of the export tests: the JAX reference embeddings and the torch runners."""

from __future__ import annotations

import numpy as np


def right_padded(ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (tokens [n, longest] int32 right-padded with 0, lengths [n])."""
    lengths = np.array([len(x) for x in ids])
    tokens = np.zeros((len(ids), lengths.max()), np.int32)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
    return tokens, lengths


def jax_embeddings(params, enc, ids: list[np.ndarray], rank, layers) -> np.ndarray:
    """What training pools: the last token of each text after `layers` layers, at MEL rank
    `rank`, final norm applied. Returns [n, d] float32 (not normalised)."""
    import jax.numpy as jnp

    from mlembed_jax.model.encoder import encode
    from mlembed_jax.model.qwen3 import padded_inputs

    tokens, lengths = right_padded(ids)
    seg, pos, pool = padded_inputs(tokens, lengths)
    out = encode(params, enc, jnp.asarray(tokens), seg, pos, pool, rank=rank, num_layers=layers)
    return np.asarray(out["pooled"][-1])  # the last exit of a K-layer model is K itself


def hf_last_token(model_dir: str, ids: list[np.ndarray]) -> np.ndarray:
    """transformers.AutoModel in torch fp32: last_hidden_state at each text's last token."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, lengths = right_padded(ids)
    mask = (np.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                       attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    return hidden[np.arange(len(ids)), lengths - 1]


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class InputRecorder:
    """Records the input_ids / attention_mask the Transformer module of a SentenceTransformer
    receives, i.e. exactly what `encode` feeds the model. (The module calls its HF model's
    `forward` method directly, so a hook on the HF model itself would never fire.)"""

    def __init__(self, st_model):
        self.calls = []
        self._handle = st_model[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        features = args[0] if args else kwargs["features"]
        self.calls.append((features["input_ids"].numpy().copy(),
                           features["attention_mask"].numpy().copy()))

    def texts_ids(self) -> list[list[int]]:
        """Every text's unpadded ids, in the order the model saw them."""
        return [ids[m.astype(bool)].tolist() for batch, mask in self.calls
                for ids, m in zip(batch, mask)]

    def close(self):
        self._handle.remove()
