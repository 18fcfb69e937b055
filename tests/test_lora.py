"""LoRA (model/lora.py): the adapted forward against peft's, merging, config refusals, and the
train step with the base frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_helpers import make_hf_qwen3

from mlembed_jax.config import LORA_TARGETS, ConfigError, apply_overrides, base_config, validate
from mlembed_jax.model import lora
from mlembed_jax.model.encoder import encode, init_params
from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params
from mlembed_jax.model.qwen3 import EncoderConfig, padded_inputs

TOL = 1e-5  # fp32 bound set by the issue for adapted and merged forwards


def _random_adapters(params, lcfg, seed=1, b_std=0.05):
    """Adapters as init_adapters makes them, but with B non-zero so they change the output."""
    ad = lora.init_adapters(params, lcfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: b_std * jax.random.normal(next(keys), x.shape) if p[-1].key == "B" else x,
        ad)


def _batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(2, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def _copy_into_peft(peft_model, adapters, lcfg, num_layers):
    """Our A [L, *in, r], B [L, r, *out] -> peft's lora_A [r, in], lora_B [out, r] per layer."""
    layers = peft_model.base_model.model.layers
    with torch.no_grad():
        for target in lcfg.targets:
            module, _ = lora.TARGETS[target]
            ad = adapters["layers"][module][target]
            for i in range(num_layers):
                a = np.asarray(ad["A"][i]).reshape(-1, lcfg.rank)
                b = np.asarray(ad["B"][i]).reshape(lcfg.rank, -1)
                lin = getattr(getattr(layers[i], module), target)
                lin.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
                lin.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))


def test_targets_are_the_config_vocabulary():
    assert tuple(lora.TARGETS) == LORA_TARGETS


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q_proj", "v_proj", "down_proj")])
def test_adapted_forward_matches_peft(tmp_path, targets):
    model = make_hf_qwen3(tmp_path)
    cfg = encoder_config_from_hf(str(tmp_path), exits=(2, 5))
    params = load_hf_params(str(tmp_path), cfg)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = _random_adapters(params, lcfg)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=lcfg.rank, lora_alpha=lcfg.alpha, target_modules=list(targets), lora_dropout=0.0))
    _copy_into_peft(pm, adapters, lcfg, cfg.num_layers)
    pm.eval()

    lengths = [7, 12, 3]
    ids, mask = _batch(cfg.vocab_size, lengths)
    with torch.no_grad():
        hf = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                output_hidden_states=True).hidden_states[1:]
        with pm.disable_adapter():
            base_last = pm(input_ids=torch.tensor(ids),
                           attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    seg, pos, pool = padded_inputs(ids, lengths)
    out = lora.encode(params, adapters, lcfg, cfg, jnp.asarray(ids, jnp.int32), seg, pos, pool,
                      return_hidden=True)
    valid = mask.astype(bool)
    for layer in range(cfg.num_layers):
        err = np.abs(np.asarray(out["hidden"][layer])[valid] - hf[layer].numpy()[valid]).max()
        assert err <= TOL, f"layer {layer + 1}: max abs error {err}"
    last = np.asarray(lengths) - 1
    want = hf[-1].numpy()[np.arange(len(lengths)), last]
    assert np.abs(np.asarray(out["pooled"][-1]) - want).max() <= TOL
    # The adapters matter: the adapted model is not the base (Qwen3-Embedding#167's symptom).
    base = base_last[np.arange(len(lengths)), last]
    assert np.abs(want - base).max() > 100 * TOL


def _tiny(**kw):
    return EncoderConfig(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                                   exits=(1, 3)), **kw})


@pytest.mark.parametrize("mel", [False, True])
def test_merged_forward_equals_adapted_forward(mel):
    enc = _tiny(mel=mel, mel_r_max=32, mel_r_min=8, remat="full")
    params = init_params(enc, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=4, alpha=16.0)
    adapters = _random_adapters(params, lcfg)
    ids, mask = _batch(enc.vocab_size, [5, 8, 2])
    seg, pos, pool = padded_inputs(ids, mask.sum(1))
    tokens = jnp.asarray(ids, jnp.int32)
    rank = 16 if mel else None
    adapted = lora.encode(params, adapters, lcfg, enc, tokens, seg, pos, pool, rank=rank)
    merged_params = lora.merge_adapters(params, adapters, lcfg)
    merged = encode(merged_params, enc, tokens, seg, pos, pool, rank=rank)
    base = encode(params, enc, tokens, seg, pos, pool, rank=rank)
    assert np.abs(np.asarray(adapted["pooled"]) - np.asarray(merged["pooled"])).max() <= TOL
    assert np.abs(np.asarray(adapted["pooled"]) - np.asarray(base["pooled"])).max() > 1e-3
    # Merging leaves the base untouched and changes exactly the targeted kernels.
    for target in LORA_TARGETS:
        module, _ = lora.TARGETS[target]
        assert not np.array_equal(merged_params["layers"][module][target],
                                  params["layers"][module][target])
    np.testing.assert_array_equal(merged_params["layers"]["input_layernorm"]["scale"],
                                  params["layers"]["input_layernorm"]["scale"])


def test_fresh_adapters_leave_the_base_forward_unchanged():
    enc = _tiny()
    params = init_params(enc, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "o_proj"))
    adapters = lora.init_adapters(params, lcfg, jax.random.key(3))
    shapes = jax.tree_util.tree_map(lambda x: x.shape, adapters)
    # A [L, *in, r], B [L, r, *out]: o_proj's input is (heads, head_dim).
    assert shapes == {"layers": {"self_attn": {
        "q_proj": {"A": (3, 32, 2), "B": (3, 2, 4, 8)},
        "o_proj": {"A": (3, 4, 8, 2), "B": (3, 2, 32)}}}}
    ids, mask = _batch(enc.vocab_size, [4, 6])
    seg, pos, pool = padded_inputs(ids, mask.sum(1))
    tokens = jnp.asarray(ids, jnp.int32)
    a = lora.encode(params, adapters, lcfg, enc, tokens, seg, pos, pool)["pooled"]
    b = encode(params, enc, tokens, seg, pos, pool)["pooled"]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("override,message", [
    ({"model.lora.rank": -1}, "model.lora.rank=-1 must be an integer >= 0"),
    ({"model.lora.rank": 4, "model.lora.targets": ("q_proj", "lm_head")},
     "model.lora.targets=('q_proj', 'lm_head') must list distinct projections"),
    ({"model.lora.rank": 4, "model.lora.targets": ()}, "model.lora.targets=() must list"),
    ({"model.lora.rank": 4, "model.lora.alpha": 0.0}, "model.lora.alpha=0.0 must be > 0"),
    ({"model.lora.rank": 4, "model.lora.dropout": 0.1},
     "model.lora.dropout=0.1: adapter dropout is not implemented; set model.lora.dropout=0"),
])
def test_config_refuses_bad_lora_settings(override, message):
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(base_config(), override))
    assert message in str(e.value)


def test_lora_is_off_by_default_and_reads_its_block():
    c = base_config()
    assert lora.LoraConfig.from_config(c.model) is None
    apply_overrides(c, {"model.lora.rank": "8", "model.lora.targets": "('q_proj', 'v_proj')"})
    validate(c)
    assert lora.LoraConfig.from_config(c.model) == lora.LoraConfig(8, 8.0, ("q_proj", "v_proj"))
