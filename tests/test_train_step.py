"""The train step's gradient flow: teacher frozen, MEL factors trained, per-group lr."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import make_hf_qwen3
from train_helpers import ROOT, small_config

from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.loss import config_kwargs
from mlembed_jax.metrics_log import read_metrics
from mlembed_jax.model.encoder import init_params
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.optim import make_optimizer
from mlembed_jax.train import run
from mlembed_jax.train_step import (
    StepSetup,
    fresh_state,
    pair_teacher,
    step_loss,
    teacher_config,
    teacher_exit_layers,
    train_step,
)


@pytest.fixture(scope="module")
def parts():
    config = small_config()
    it = make_train_iterator(config, 1, prefetch=0)
    batches = [next(it)[0] for _ in range(3)]
    enc = EncoderConfig.from_config(config.model)
    return config, enc, it.global_geometry, batches


def _setup(config, enc, geometry, teacher=None, pairing="position", **optim):
    ocfg = config.optim.copy_and_resolve_references()
    with ocfg.unlocked():
        ocfg.update(optim)
    tx, schedule = make_optimizer(ocfg, 10)
    pairs = ()
    if teacher is not None:
        teacher, pairs = pair_teacher(enc, teacher, pairing)
    return StepSetup(enc=enc, geometry=geometry, tx=tx, schedule=schedule,
                     loss_kwargs={**config_kwargs(config.loss), "kd_weight": 1.0},
                     num_datasets=3, teacher=teacher, teacher_pairs=pairs)


@pytest.mark.slow  # test_loss checks the KD term's teacher gradient is zero
def test_no_gradient_reaches_the_teacher(parts):
    config, enc, geometry, batches = parts
    teacher_cfg = dataclasses.replace(enc, mel=False)  # the student's depth and exits
    teacher = init_params(teacher_cfg, jax.random.key(7))
    setup = _setup(config, enc, geometry, teacher_cfg)
    assert setup.teacher_pairs == (0, 1)
    student = init_params(enc, jax.random.key(0))
    grad_t = jax.grad(lambda t: step_loss(setup, student, batches[0], t, 16)[0])(teacher)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grad_t))
    grad_s = jax.grad(lambda s: step_loss(setup, s, batches[0], teacher, 16)[0])(student)
    assert float(jnp.abs(grad_s["embed_tokens"]["U"]).max()) > 0
    _, metrics = step_loss(setup, student, batches[0], teacher, 16)
    assert float(metrics["kd"]) > 0


def test_mel_has_no_plain_table_and_its_factors_train(parts):
    config, enc, geometry, batches = parts
    setup = _setup(config, enc, geometry)
    state = fresh_state(setup, init_params(enc, jax.random.key(0)), 0)
    assert set(state.params["embed_tokens"]) == {"U", "V"}  # W is never a parameter
    before = state.params
    step = jax.jit(lambda s, b: train_step(setup, s, b))
    for b in batches:
        state, m = step(state, b)
        assert int(m["mel_rank"]) in (8, 16, 32)
    for name in ("U", "V"):
        assert not np.allclose(state.params["embed_tokens"][name],
                               before["embed_tokens"][name])


def test_mel_learning_rate_group(parts):
    config, enc, geometry, batches = parts
    setup = _setup(config, enc, geometry, mel_lr=0.0)
    state = fresh_state(setup, init_params(enc, jax.random.key(0)), 0)
    before = state.params
    step = jax.jit(lambda s, b: train_step(setup, s, b))
    for b in batches[:2]:  # the first update has lr 0: warmup starts from zero
        state, _ = step(state, b)
    # lr 0 for the MEL group: U, V stay put (no weight decay either); the layers move.
    np.testing.assert_array_equal(state.params["embed_tokens"]["U"],
                                  before["embed_tokens"]["U"])
    assert not np.allclose(state.params["layers"]["mlp"]["up_proj"],
                           before["layers"]["mlp"]["up_proj"])


@pytest.mark.integration
def test_train_with_hf_init_and_hf_teacher(tmp_path):
    """train.init_from and loss.teacher read real HF directories saved by transformers."""
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    shape = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    make_hf_qwen3(student_dir, **shape)
    make_hf_qwen3(teacher_dir, seed=1, **{**shape, "hidden_size": 96,
                                          "num_hidden_layers": 3})
    cfg = small_config(**{"train.max_steps": 2, "train.init_from": str(student_dir),
                          "loss.teacher": str(teacher_dir), "loss.kd_weight": 1.0})
    assert run(cfg, str(tmp_path / "w")) == 0
    logged = [m for m in read_metrics(str(tmp_path / "w")) if "train/kd" in m]
    assert len(logged) == 2 and all(m["train/kd"] > 0 for m in logged)


@pytest.mark.parametrize("mel_lr", [-1.0, 1e-4])
def test_optimizer_moments_are_sharded_like_their_params(parts, mel_lr):
    """Also with a separate MEL learning rate, whose multi_transform masks the state."""
    from mlembed_jax.config import base_config
    from mlembed_jax.sharding import make_mesh
    from mlembed_jax.train_step import abstract_state, state_shardings

    config, enc, geometry, _ = parts
    setup = _setup(config, enc, geometry, mel_lr=mel_lr)
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = make_mesh(c.mesh)
    abstract = abstract_state(setup)
    sh = state_shardings(setup, mesh, c.mesh.logical_axis_rules, abstract)
    want = sh.params["layers"]["self_attn"]["q_proj"].spec
    assert "fsdp" in want and "tensor" in want
    found = [s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh.opt_state)
             if "q_proj" in jax.tree_util.keystr(p)]
    assert len(found) == 2 and all(f == want for f in found)  # Adam's mu and nu


def test_eval_accuracies_match_numpy_with_blocks_and_pack_lookups(parts):
    """eval_step's retrieval accuracies, computed with pack-local lookups and in-batch row
    blocks (what big batches need), equal a plain NumPy computation on the same embeddings."""
    from mlembed_jax.batch import globalize_slots
    from mlembed_jax.train_step import eval_step, pooled_embeddings

    config, enc, geometry, batches = parts
    params = init_params(enc, jax.random.key(0))
    # A batch with in-batch retrieval samples (others draw clustering/classification sets).
    batch = next(b for b in batches
                 if (np.asarray(b["in_batch"]) & np.asarray(b["sample_valid"])).any())
    slots = jax.tree.map(np.asarray, globalize_slots(batch, geometry))
    setup = _setup(config, enc, geometry)
    emb = np.asarray(pooled_embeddings(setup, params, batch, None)[-1], np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    q, p = emb[slots["query_text"]], emb[slots["positive_text"]]
    valid = slots["sample_valid"].astype(bool)
    sim = np.where(valid[None], q @ p.T, -np.inf)
    retrieval = valid & slots["in_batch"].astype(bool)
    want_ib = (sim.argmax(1) == np.arange(len(q)))[retrieval].mean()
    neg = np.einsum("sd,snd->sn", q, emb[slots["negative_text"]])
    beats = np.where(slots["negative_valid"], neg < (q * p).sum(-1)[:, None], True).all(-1)
    want_hard = beats[valid].mean()
    for packs, block in ((None, 0), (geometry.packs, 3)):
        setup = _setup(config, enc, geometry)
        setup = dataclasses.replace(setup, loss_kwargs={**setup.loss_kwargs, "packs": packs,
                                                        "in_batch_block_size": block})
        m = eval_step(setup, params, batch)
        np.testing.assert_allclose(float(m["acc_in_batch"]), want_ib, atol=1e-6)
        np.testing.assert_allclose(float(m["acc_hard"]), want_hard, atol=1e-6)
    assert 0 < valid.sum() and 0 < want_hard  # the batch really has samples to score


def test_teacher_exits_pair_by_position(parts, tmp_path):
    """The reference's KD pairing (the default): student exit i with teacher_outputs[i], both
    exit lists deepest first. A 0.6B student (28 layers) with a 4B teacher (36 layers)."""
    from transformers import Qwen3Config

    from mlembed_jax.config import load_config_file

    student = (28, 24, 16, 8, 4, 2, 1)  # the recipe's exits for 28 layers, deepest first
    teacher = (36, 32, 24, 16, 8, 4, 2, 1)  # ... and for 36
    want = {s: teacher[i] for i, s in enumerate(student)}  # teacher_outputs[i]
    got = teacher_exit_layers(sorted(student), 28, 36)
    assert got == tuple(want[e] for e in sorted(student)) == (2, 4, 8, 16, 24, 32, 36)
    by_layer = teacher_exit_layers(sorted(student), 28, 36, "layer")
    assert sum(a != b for a, b in zip(got, by_layer)) == 6  # of the 7 exits
    # The same through a run's config: the 0.6B config with a 4B-shaped teacher directory
    # (its config.json, written by transformers).
    Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, tie_word_embeddings=True).save_pretrained(tmp_path)
    config = load_config_file(os.path.join(ROOT, "configs", "0.6b.py"),
                              {"loss.teacher": str(tmp_path), "loss.kd_weight": 1.0})
    assert config.loss.kd_exit_pairing == "position"
    enc = EncoderConfig.from_config(config.model)
    t, pairs = teacher_config(config, enc)
    assert enc.exits == tuple(sorted(student))
    assert tuple(t.exits[i] for i in pairs) == got and t.exits == (2, 4, 8, 16, 24, 32, 36)
    with config.unlocked():
        config.loss.kd_exit_pairing = "layer"
    t, pairs = teacher_config(config, enc)
    assert tuple(t.exits[i] for i in pairs) == by_layer == (1, 2, 4, 8, 16, 24, 36)


def test_shallower_teacher_extension():
    """The reference has no pairing for a teacher with fewer exits than the student
    (IndexError); here the student's extra, shallowest exits take the teacher's shallowest."""
    # Student 8 layers: (8, 4, 2, 1); teacher 3 layers: recipe exits (3, 2, 1).
    assert teacher_exit_layers((1, 2, 4, 8), 8, 3) == (1, 1, 2, 3)
    assert teacher_exit_layers((1, 2, 4, 8), 8, 3, "layer") == (1, 2, 3, 3)
    # Student 28 layers, teacher 20: (20, 16, 8, 4, 2, 1) for 7 student exits.
    assert teacher_exit_layers((1, 2, 4, 8, 16, 24, 28), 28, 20) == (1, 1, 2, 4, 8, 16, 20)


def test_teacher_exits_pair_with_the_students(parts):
    """Layer pairing (loss.kd_exit_pairing=layer): same depth -> the student's exits, paired
    by index; a deeper teacher -> intermediate exits at the same layer, last with last. And
    the step reads the teacher where either pairing says."""
    from mlembed_jax.model.encoder import encode
    from mlembed_jax.train_step import _teacher_pooled

    assert teacher_exit_layers((1, 2, 4, 8, 16, 24, 28), 28, 28, "layer") == \
        (1, 2, 4, 8, 16, 24, 28)
    assert teacher_exit_layers((1, 2, 4, 8, 16, 24, 28), 28, 36, "layer") == \
        (1, 2, 4, 8, 16, 24, 36)
    # A teacher of the student's depth: the same exits either way.
    assert teacher_exit_layers((1, 2, 4, 8, 16, 24, 28), 28, 28) == (1, 2, 4, 8, 16, 24, 28)
    config, enc, geometry, batches = parts
    assert enc.exits == (1, 2)
    deeper = dataclasses.replace(enc, mel=False, hidden_size=48, num_layers=3, exits=(1, 2, 3))
    params = init_params(deeper, jax.random.key(3))
    b = batches[0]
    # Student exits (1, 2) read teacher layers (1, 3) by layer, (2, 3) by position.
    for pairing, layers in (("layer", (1, 3)), ("position", (2, 3))):
        setup = _setup(config, enc, geometry, deeper, pairing)
        assert setup.teacher.exits == layers and setup.teacher_pairs == (0, 1)
        got = _teacher_pooled(setup, params, b)
        assert got.shape[:2] == (2, b["pool_index"].size)
        for i, layer in enumerate(layers):
            want = encode(params, deeper, b["tokens"], b["segment_ids"], b["positions"],
                          b["pool_index"], num_layers=layer)["pooled"][-1]
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


