"""Config files: exact Qwen3 shapes, validation errors, command-line style overrides."""

import glob
import os

import ml_collections
import pytest

from mlembed_jax.config import ConfigError, load_config_file, validate
from mlembed_jax.model.encoder import abstract_params
from mlembed_jax.model.qwen3 import EncoderConfig, param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# The published Qwen3 shapes: (hidden, intermediate, layers, q heads, kv heads, tied).
RECIPE_SHAPES = {
    "0.6b": (1024, 3072, 28, 16, 8, True),
    "1.7b": (2048, 6144, 28, 16, 8, True),
    "4b": (2560, 9728, 36, 32, 8, True),
    "8b": (4096, 12288, 36, 32, 8, False),
}


@pytest.mark.parametrize("size", sorted(RECIPE_SHAPES))
def test_size_configs_have_recipe_shapes(size):
    m = load_config_file(os.path.join(CONFIGS, f"{size}.py")).model
    got = (m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads,
           m.tie_word_embeddings)
    assert got == RECIPE_SHAPES[size]
    assert (m.vocab_size, m.head_dim, m.rope_theta, m.rms_norm_eps) == (151936, 128, 1e6, 1e-6)
    assert m.mel and m.mel_r_max == 512


def test_every_config_file_loads_and_validates():
    files = [f for f in glob.glob(os.path.join(CONFIGS, "*.py"))
             if not os.path.basename(f).startswith("_")]
    assert len(files) >= 6
    for f in files:
        assert isinstance(load_config_file(f), ml_collections.ConfigDict)


def test_140m_param_count_matches_its_docstring():
    import importlib.util

    spec = importlib.util.spec_from_file_location("c140", os.path.join(CONFIGS, "140m.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = EncoderConfig.from_config(mod.get_config().model)
    n = param_count(abstract_params(cfg))
    assert n == mod.PARAMS_140M
    assert 130e6 < n < 150e6


def test_overrides_apply_and_unknown_fields_are_rejected():
    path = os.path.join(CONFIGS, "tiny.py")
    c = load_config_file(path, {"model.num_layers": 2, "optim.lr": 3e-4})
    assert c.model.num_layers == 2 and c.optim.lr == 3e-4
    with pytest.raises(ConfigError, match="unknown config field 'model.num_layer'"):
        load_config_file(path, {"model.num_layer": 2})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(os.path.join(CONFIGS, "nope.py"))


@pytest.mark.parametrize("overrides,message", [
    ({"model.mel_r_min": 64, "model.mel_r_max": 32}, "mel_r_min=64 must be in"),
    ({"model.mel_r_max": 100}, "exceeds min\\(vocab_size, hidden_size\\)"),
    ({"model.exits": (1, 9)}, "exits must lie in \\[1, num_layers=4\\]"),
    ({"model.num_heads": 3}, "not a multiple of model.num_kv_heads"),
    ({"model.param_dtype": "float16"}, "param_dtype"),
    ({"model.attention": "flash9000"}, "model.attention"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one of"),
    ({"data.max_seq_length": 128}, "exceeds data.seq_len"),
    ({"data.rows_per_pack": (19, 0)}, "data.rows_per_pack=\\(19, 0\\) must be \\(\\)"),
    ({"data.task_types": ("retrieval", "ranking")}, "data.task_types has \\['ranking'\\]"),
    ({"loss.teacher": "/some/teacher"}, "loss.teacher='/some/teacher' is set but "
     "loss.kd_weight=0.0: set loss.kd_weight > 0"),
    ({"loss.kd_weight": 1.0}, "loss.kd_weight=1.0 needs a teacher"),
    ({"loss.in_batch_gradient": "positives"}, "must be 'full' or 'queries'"),
    ({"loss.kd_exit_pairing": "index"}, "loss.kd_exit_pairing='index' must be 'position' or "
     "'layer'"),
    ({"optim.schedule": "linear"}, "optim.schedule='linear' must be one of cosine, "
     "cosine_to_min_lr, constant_with_warmup"),
    ({"train.grad_cache_chunks": -2}, "train.grad_cache_chunks=-2 must be 0 \\(off\\)"),
])
def test_validate_rejects_nonsense(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config_file(os.path.join(CONFIGS, "tiny.py"), overrides)


def test_validate_reports_every_problem_at_once():
    c = load_config_file(os.path.join(CONFIGS, "tiny.py"))
    c.model.num_heads = 3
    c.loss.temperature = 0.0
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert "num_heads" in str(e.value) and "temperature" in str(e.value)


def test_apply_overrides_parses_strings_as_the_fields_type():
    from mlembed_jax.config import ConfigError, apply_overrides, base_config

    c = base_config()
    c.lock()
    apply_overrides(c, {"model.remat": "attention", "model.num_layers": "3",
                        "optim.lr": "1e-4", "model.mel": "false"})
    assert (c.model.remat, c.model.num_layers, c.optim.lr, c.model.mel) == \
        ("attention", 3, 1e-4, False)
    with pytest.raises(ConfigError, match="'model.num_layers' holds int; cannot set it to 'x'"):
        apply_overrides(c, {"model.num_layers": "x"})
    with pytest.raises(ConfigError, match="unknown config field 'model.nope'"):
        apply_overrides(c, {"model.nope": "1"})
    # Tuple fields (the row buckets) from the command line or a Python int.
    for text, want in (("19", (19,)), ("18,20", (18, 20)), ("(18, 20, 24)", (18, 20, 24)),
                       ("", ())):
        apply_overrides(c, {"data.rows_per_pack": text})
        assert c.data.rows_per_pack == want, text
    apply_overrides(c, {"data.rows_per_pack": 40})
    assert c.data.rows_per_pack == (40,)
    with pytest.raises(ConfigError, match="holds tuple; cannot set it to 'x'"):
        apply_overrides(c, {"data.rows_per_pack": "x"})


@pytest.mark.parametrize("size", sorted(RECIPE_SHAPES))
def test_size_configs_take_the_fast_path_by_default(size):
    from mlembed_jax.model.kernel_choice import choose, remat_for

    c = load_config_file(os.path.join(CONFIGS, f"{size}.py"))
    assert c.model.attention == "auto"
    # On TPU: splash at the recipe's 1024-token rows, keeping its residuals except where the
    # AOT compile says they do not fit (4B on v6e-64, presets.QWEN3_LAYOUT); on CPU: dense
    # with the causal upper half skipped (rows of 1024 hold 8 blocks).
    tpu = choose(c.model.attention, "tpu", c.data.seq_len)
    assert tpu.kernel == "splash"
    assert remat_for(c.model.remat, tpu.kernel) == ("full" if size == "4b" else "attention")
    cpu = choose(c.model.attention, "cpu", c.data.seq_len)
    assert (cpu.kernel, remat_for(c.model.remat, cpu.kernel)) == ("dense_blocks", "full")


def test_base_config_stays_dense():
    from mlembed_jax.config import base_config

    m = base_config().model
    assert (m.attention, m.remat) == ("dense", "auto")  # auto with dense: "full", as before
