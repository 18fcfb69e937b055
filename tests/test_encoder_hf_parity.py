"""Our Qwen3 encoder vs transformers' own Qwen3Model, from a checkpoint saved by transformers."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_helpers import make_hf_qwen3

from mlembed_jax.model.encoder import encode
from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params
from mlembed_jax.model.qwen3 import padded_inputs

TOL = 1e-4  # fp32 parity bound set by the issue


def _hf_hidden(model, ids, attention_mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention_mask),
                    output_hidden_states=True)
    # hidden_states[0] is the embedding output; [k] the output of layer k (the last one normed).
    return [h.numpy() for h in out.hidden_states[1:]]


def _batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(2, vocab, n)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("tied,causal_lm,shard", [(True, False, None), (False, True, "60KB")])
def test_every_layer_and_exit_match_transformers(tmp_path, tied, causal_lm, shard):
    model = make_hf_qwen3(tmp_path, tied=tied, causal_lm=causal_lm, max_shard_size=shard)
    if shard:
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cfg = encoder_config_from_hf(str(tmp_path), exits=(1, 2, 4, 5))
    assert cfg.tie_word_embeddings is tied
    params = load_hf_params(str(tmp_path), cfg)
    lengths = [7, 12, 3]
    ids, mask = _batch(cfg.vocab_size, lengths)
    hf = _hf_hidden(model, ids, mask)

    seg, pos, pool = padded_inputs(ids, lengths)
    out = encode(params, cfg, jnp.asarray(ids, jnp.int32), seg, pos, pool, return_hidden=True)
    ours = np.asarray(out["hidden"])
    valid = mask.astype(bool)
    for layer in range(cfg.num_layers):
        err = np.abs(ours[layer][valid] - hf[layer][valid]).max()
        assert err <= TOL, f"layer {layer + 1}: max abs error {err}"

    # MLL exits: the normed hidden state of transformers at that layer, at the last token.
    norm = model.norm
    last = np.asarray(lengths) - 1
    for e_i, exit_layer in enumerate(cfg.exits):
        h = torch.tensor(hf[exit_layer - 1][np.arange(len(lengths)), last])
        want = h.numpy() if exit_layer == cfg.num_layers else norm(h).detach().numpy()
        err = np.abs(np.asarray(out["pooled"][e_i]) - want).max()
        assert err <= TOL, f"exit {exit_layer}: max abs error {err}"


def test_mel_full_rank_reproduces_embedding(tmp_path):
    model = make_hf_qwen3(tmp_path)
    cfg = encoder_config_from_hf(str(tmp_path), mel=True, mel_r_max=64, mel_r_min=16)
    params = load_hf_params(str(tmp_path), cfg)
    w = model.embed_tokens.weight.detach().numpy()
    u, v = params["embed_tokens"]["U"], params["embed_tokens"]["V"]
    rel = np.abs(u @ v - w).max() / np.abs(w).max()
    assert rel <= 1e-4, rel
    # At full rank the MEL encoder is the plain encoder.
    plain_cfg = encoder_config_from_hf(str(tmp_path))
    plain = load_hf_params(str(tmp_path), plain_cfg)
    ids, _ = _batch(cfg.vocab_size, [9, 4])
    seg, pos, pool = padded_inputs(ids, [9, 4])
    a = encode(params, cfg, jnp.asarray(ids, jnp.int32), seg, pos, pool, rank=64)["pooled"]
    b = encode(plain, plain_cfg, jnp.asarray(ids, jnp.int32), seg, pos, pool)["pooled"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_truncated_model_equals_first_layers(tmp_path):
    model = make_hf_qwen3(tmp_path)
    cfg = encoder_config_from_hf(str(tmp_path))
    params = load_hf_params(str(tmp_path), cfg)
    ids, mask = _batch(cfg.vocab_size, [6, 10])
    hf = _hf_hidden(model, ids, mask)
    seg, pos, pool = padded_inputs(ids, [6, 10])
    out = encode(params, cfg, jnp.asarray(ids, jnp.int32), seg, pos, pool, num_layers=2)
    assert out["pooled"].shape[0] == 2  # exits 1 and 2 of the 2-layer model
    h2 = torch.tensor(hf[1][[0, 1], [5, 9]])
    np.testing.assert_allclose(np.asarray(out["pooled"][-1]),
                               model.norm(h2).detach().numpy(), atol=TOL)


def test_import_first_layers_of_a_deeper_checkpoint(tmp_path):
    """How configs/140m.py starts: 0.6B's first layers plus a low-rank MEL embedding."""
    import dataclasses

    from mlembed_jax.model.hf_import import CheckpointError

    model = make_hf_qwen3(tmp_path)
    full = encoder_config_from_hf(str(tmp_path))
    cut = dataclasses.replace(full, num_layers=2, exits=(1, 2))
    with pytest.raises(CheckpointError, match="num_layers: checkpoint 5, config 2"):
        load_hf_params(str(tmp_path), cut)
    params = load_hf_params(str(tmp_path), cut, allow_fewer_layers=True)
    assert params["layers"]["mlp"]["up_proj"].shape[0] == 2
    want = model.layers[1].mlp.up_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"][1], want)
