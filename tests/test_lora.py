"""LoRA (model/lora.py): the adapted forward against peft's, merging, config refusals, and the
train step with the base frozen."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_helpers import make_hf_qwen3
from train_helpers import small_config

from mlembed_jax.config import LORA_TARGETS, ConfigError, apply_overrides, base_config, validate
from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.loss import config_kwargs
from mlembed_jax.model import lora
from mlembed_jax.model.encoder import encode, init_params
from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params
from mlembed_jax.model.qwen3 import EncoderConfig, padded_inputs
from mlembed_jax.optim import make_optimizer
from mlembed_jax.sharding import make_mesh, to_global_batch
from mlembed_jax.train_step import StepSetup, build_step, fresh_state, loss_and_grads, train_step

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
    # A truncated model (an MLL point) cuts the adapters with the layers.
    short = lora.encode(params, adapters, lcfg, enc, tokens, seg, pos, pool, rank=rank,
                        num_layers=2)["pooled"][-1]
    want = encode(merged_params, enc, tokens, seg, pos, pool, rank=rank,
                  num_layers=2)["pooled"][-1]
    assert np.abs(np.asarray(short) - np.asarray(want)).max() <= TOL
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


# ------------------------------------------------------------------------------------------
# The train step with LoRA: demo data, the small model of the training tests (MEL on, MLL
# exits 1 and 2, MRL dims), adapters on every projection.

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0}


@pytest.fixture(scope="module")
def lora_parts():
    config = small_config(**LORA, **{"data.packs_per_step": 4, "optim.warmup_steps": 0,
                                     "optim.lr": 1e-3})
    it = make_train_iterator(config, 4, prefetch=0)
    batch = next(b for b, _ in (next(it) for _ in range(20))
                 if (b["in_batch"] & b["sample_valid"]).any())
    enc = EncoderConfig.from_config(config.model)
    return config, it.global_geometry, batch, enc


def _lora_setup(config, geometry, enc, chunks=0, teacher=None):
    tx, schedule = make_optimizer(config.optim, 100)
    kw = config_kwargs(config.loss)
    if teacher is not None:
        kw["kd_weight"] = 1.0
    return StepSetup(enc=enc, geometry=geometry, tx=tx, schedule=schedule, loss_kwargs=kw,
                     num_datasets=3, teacher=teacher, grad_cache_chunks=chunks,
                     lora=lora.LoraConfig.from_config(config.model))


def test_lora_steps_move_only_the_adapters_and_the_loss_falls(lora_parts):
    config, geometry, batch, enc = lora_parts
    setup = _lora_setup(config, geometry, enc)
    assert enc.mel and enc.exits == (1, 2) and setup.loss_kwargs["mrl_min_dim"] < enc.hidden_size
    base = init_params(enc, jax.random.key(0))
    base_before = jax.tree_util.tree_map(np.array, base)
    adapters = lora.init_adapters(base, setup.lora, jax.random.key(1))
    state = fresh_state(setup, adapters, 0)
    # The optimizer holds the adapters' moments only: no leaf of a base param's size.
    adapter_shapes = {x.shape for x in jax.tree_util.tree_leaves(adapters)}
    assert {x.shape for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim} \
        == adapter_shapes
    step = jax.jit(lambda s, b, base: train_step(setup, s, b, base_params=base))
    losses = []
    for _ in range(8):  # one batch, repeated
        state, m = step(state, batch, base)
        assert float(m["nonfinite"]) == 0 and "mel_rank" in m
        losses.append(float(m["total"]))
    assert losses[-1] < 0.9 * losses[0], losses
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, base_before)  # bit-identical
    for path, new in jax.tree_util.tree_leaves_with_path(state.params):
        old = adapters
        for k in path:
            old = old[k.key]
        assert not np.allclose(new, old), jax.tree_util.keystr(path)


def _max_rel_diff(got, want):
    return max(float(np.abs(np.asarray(g) - np.asarray(w)).max() / np.abs(np.asarray(w)).max())
               for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))


def test_lora_cached_gradients_equal_the_plain_step_with_kd(lora_parts):
    config, geometry, batch, enc = lora_parts
    teacher_cfg = dataclasses.replace(enc, mel=False)  # the student's exits, paired by index
    teacher = init_params(teacher_cfg, jax.random.key(7))
    base = init_params(enc, jax.random.key(0))
    setup = _lora_setup(config, geometry, enc, teacher=teacher_cfg)
    adapters = _random_adapters(base, setup.lora)  # B != 0, so A has gradients too

    def grads(chunks):
        s = dataclasses.replace(setup, grad_cache_chunks=chunks)
        fn = jax.jit(lambda a: loss_and_grads(s, a, batch, teacher, rank=16, base_params=base))
        return jax.device_get(fn(adapters))

    (loss, metrics), want = grads(0)
    assert metrics["kd"] > 0 and metrics["in_batch"] > 0
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(adapters)
    assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(want))
    for chunks in (4,):  # one pack per chunk
        (c_loss, c_metrics), got = grads(chunks)
        assert abs(c_loss - loss) <= 1e-5 * abs(loss)
        np.testing.assert_allclose(c_metrics["kd"], metrics["kd"], rtol=1e-5)
        assert _max_rel_diff(got, want) <= 1e-5, chunks


def test_built_lora_step_shards_adapters_like_their_weights_and_keeps_the_base(lora_parts):
    """build_step with model.lora: the state is adapters + their moments, sharded by the
    weights' logical axes; the jitted step takes the base last and leaves it as it was."""
    config, geometry, batch, _ = lora_parts
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.update({"num_devices": 8, "data": 2, "fsdp": 2, "tensor": 2})
    mesh = make_mesh(config.mesh)
    built = build_step(config, mesh, total_steps=10, geometries=geometry)
    sh = built.state_shardings
    q = sh.params["layers"]["self_attn"]["q_proj"]
    w_spec = built.base_shardings["layers"]["self_attn"]["q_proj"].spec
    # A [L, embed, r] follows the weight's embed placement, B [L, r, heads, head_dim] its heads.
    assert q["A"].spec[:2] == w_spec[:2] and q["A"].spec[2] is None
    assert q["B"].spec[1] is None and q["B"].spec[2:] == w_spec[2:]
    assert "fsdp" in str(w_spec) and "tensor" in str(w_spec)
    moments = [s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh.opt_state)
               if jax.tree_util.keystr(p).endswith("['q_proj']['B']")]
    assert moments == [q["B"].spec] * 2  # Adam's mu and nu

    host_base = jax.tree_util.tree_map(np.asarray, init_params(built.setup.enc,
                                                               jax.random.key(0)))
    base = built.place_base(host_base)
    state = built.init_state()
    with pytest.raises(ConfigError, match="a LoRA step takes the frozen base params"):
        built.compile_train(state)  # no base: refused before anything is lowered
    with built.rules_context():
        gb = to_global_batch(batch, geometry, mesh, built.rules)
        for _ in range(2):
            state, m = built.train(state, gb, None, base)
        metrics = built.eval(state.params, gb, None, base)
    assert int(state.step) == 2 and np.isfinite(float(m["total"]))
    assert np.isfinite(float(metrics["acc_hard"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(base), host_base)
    b = jax.device_get(state.params["layers"]["mlp"]["down_proj"]["B"])
    assert np.abs(b).max() > 0  # B left zero init: the adapters trained


def test_lora_refuses_a_separate_mel_learning_rate():
    with pytest.raises(ConfigError, match="optim.mel_lr=0.0001 has no effect with LoRA"):
        validate(apply_overrides(base_config(), {**LORA, "optim.mel_lr": 1e-4}))


def test_lora_config_refuses_what_it_cannot_do():
    for bad in (dict(rank=0, alpha=1.0), dict(rank=2, alpha=1.0, targets=("lm_head",)),
                dict(rank=2, alpha=1.0, dropout=0.1)):
        with pytest.raises(ValueError, match="LoraConfig needs rank >= 1"):
            lora.LoraConfig(**bad)
