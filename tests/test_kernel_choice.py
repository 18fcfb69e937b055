"""model.attention="auto" and the kernels' shape rules: what each platform picks and why,
splash's block sizes for every seq_len, the start-up check on real devices, model init that
never traces a kernel, and training through `train.run` with splash in Pallas' interpreter."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import small_config, train_losses

from mlembed_jax import attention_choice
from mlembed_jax.config import ConfigError, validate
from mlembed_jax.model import kernel_check
from mlembed_jax.model import kernel_choice as kc
from mlembed_jax.model.encoder import abstract_params, init_params, param_logical_axes
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.train import run

# Blocks by hand from splash's rules (jax 0.10.2 splash_attention_kernel.py: block_kv,
# block_q_dkv, block_q_dq, block_kv_dq multiples of 128; every block divides seq_len): the
# largest multiple of 128 <= 512 that divides seq_len.
SPLASH_BLOCKS = {128: 128, 256: 256, 384: 384, 512: 512, 640: 128, 768: 384, 896: 128,
                 1024: 512, 1280: 256, 1536: 512, 2048: 512, 4096: 512, 8192: 512}


def test_splash_blocks_follow_the_kernel_rules():
    for seq, blk in SPLASH_BLOCKS.items():
        assert kc.splash_block(seq) == blk, seq
        assert blk % 128 == 0 and seq % blk == 0 and blk <= 512
    for seq in (4, 64, 100, 200, 1000):
        with pytest.raises(ValueError, match=f"multiple of 128, got {seq}"):
            kc.splash_block(seq)


def test_a_seq_len_splash_cannot_serve_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention='splash'.*multiple of 128, got 200.*"
                                          "data.seq_len to e.g. 256"):
        small_config(**{"model.attention": "splash", "data.seq_len": 200,
                        "data.max_seq_length": 200})
    c = small_config(**{"model.attention": "auto", "data.seq_len": 200,
                        "data.max_seq_length": 200})
    assert c is not None and validate(c)  # auto decides per platform, at start-up


def test_auto_picks_the_platforms_kernel_and_says_why():
    tpu = kc.choose("auto", "tpu", 1024)
    assert (tpu.kernel, tpu.passed_over) == ("splash", ())
    assert "not checked on a device" in tpu.line()
    # A seq_len splash cannot serve: dense, and the log line says what to change.
    odd = kc.choose("auto", "tpu", 1000)
    assert odd.kernel == "dense"
    assert "passed over splash" in odd.line() and "data.seq_len to e.g. 1024" in odd.line()
    # CPU: dense with the causal upper half skipped, where rows have more than one block.
    assert kc.choose("auto", "cpu", 1024).kernel == "dense_blocks"
    short = kc.choose("auto", "cpu", 64)
    assert short.kernel == "dense" and "passed over dense_blocks: rows of 64 tokens are one " \
        "block of 128: nothing to skip" in short.line()
    # GPUs: tokamax's Mosaic kernel on Hopper (tokamax is a test dependency), else cuDNN; a
    # kernel that fails its check is passed over, loudly.
    assert kc.choose("auto", "gpu", 1024, compute_capability="9.0").kernel == "tokamax_mosaic"
    assert kc.choose("auto", "gpu", 1024, compute_capability="8.0").kernel == "cudnn"
    failed = kc.choose("auto", "gpu", 1024, compute_capability="9.0",
                       probe=lambda name: "off by 1" if name == "tokamax_mosaic" else None)
    assert failed.kernel == "cudnn"
    assert "passed over tokamax_mosaic: FAILED its start-up check against dense: off by 1" \
        in failed.line()
    everything_fails = kc.choose("auto", "gpu", 1024, compute_capability="9.0",
                                 probe=lambda name: "broken")
    assert everything_fails.kernel == "dense" and len(everything_fails.passed_over) == 2


def test_explicit_kernels_are_checked_not_replaced(monkeypatch):
    assert kc.choose("cudnn", "gpu", 1000).kernel == "cudnn"
    with pytest.raises(ValueError, match="NVIDIA GPUs only"):
        kc.choose("cudnn", "tpu", 1024)
    with pytest.raises(ValueError, match="TPUs only.*MLEMBED_PALLAS_INTERPRET"):
        kc.choose("splash", "cpu", 1024)
    with pytest.raises(ValueError, match="multiple of 128"):
        kc.choose("splash", "tpu", 1000)
    monkeypatch.setenv(kc.INTERPRET_ENV, "1")
    assert kc.choose("splash", "cpu", 1024).kernel == "splash"


def test_remat_auto_keeps_flash_kernel_residuals_only():
    assert [kc.remat_for("auto", k) for k in ("splash", "cudnn", "dense", "xla_sdpa")] == \
        ["attention", "attention", "full", "full"]
    assert kc.remat_for("none", "splash") == "none"
    assert kc.remat_for("auto", "auto") == "auto"


def test_resolve_on_cpu_is_dense_and_unchanged_for_the_demo():
    c = small_config()
    assert (c.model.attention, c.model.remat) == ("dense", "none")  # the demo's own
    resolved, choice = attention_choice.resolve_attention(c, jax.devices())
    assert (resolved.model.attention, resolved.model.remat, choice.kernel) == \
        ("dense", "none", "dense")
    auto = small_config(**{"model.attention": "auto", "model.remat": "auto"})
    resolved, choice = attention_choice.resolve_attention(auto, jax.devices())
    assert (resolved.model.attention, resolved.model.remat) == ("dense", "full")
    assert auto.model.attention == "auto"  # the caller's config is left as it was
    assert resolved.is_locked


def test_probe_runs_the_kernel_on_the_device():
    shape = dict(num_heads=4, num_kv_heads=2, head_dim=32, seq_len=128, dtype="float32")
    assert kernel_check.probe("xla_sdpa", **shape) is None
    # The TPU kernel outside Pallas' interpreter cannot run on a CPU: a real failure, which
    # the check reports in one line instead of raising.
    failure = kernel_check.probe("splash", **shape)
    assert failure and "\n" not in failure, failure


def test_init_never_traces_the_kernel():
    # Splash cannot serve init's [1, 4] dummy rows (nor run on a CPU), yet its model inits:
    # params, shapes and logical axes are those of the dense model, bit for bit.
    dense = EncoderConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, mel=True, mel_r_max=32,
                          mel_r_min=8, remat="attention")
    splash = dataclasses.replace(dense, attention="splash")
    assert param_logical_axes(splash) == param_logical_axes(dense)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(splash)) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(dense))
    init = jax.jit(init_params, static_argnums=0)
    a, b = init(splash, jax.random.key(3)), init(dense, jax.random.key(3))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.integration
def test_train_run_with_splash_in_the_interpreter_matches_dense(tmp_path, monkeypatch):
    # Slow-ish (about a minute on 2 cores): the real splash kernel code, run by Pallas'
    # interpreter inside the jitted, sharded train step (shard_map over 2 batch shards).
    common = {"train.max_steps": 2, "data.seq_len": 128, "data.max_seq_length": 128,
              "data.rows_per_pack": 4, "data.packs_per_step": 2, "mesh.num_devices": 2,
              "model.remat": "auto", "train.checkpoint_every": 100}
    assert run(small_config(**common), str(tmp_path / "dense")) == 0
    monkeypatch.setenv(kc.INTERPRET_ENV, "1")
    assert run(small_config(**common, **{"model.attention": "splash"}),
               str(tmp_path / "splash")) == 0
    a, b = train_losses(tmp_path / "dense"), train_losses(tmp_path / "splash")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:  # fp32: splash agrees with dense to ~1e-6 per element
        assert abs(a[step] - b[step]) <= 1e-4, (step, a[step], b[step])


def test_model_and_perf_packages_do_not_reach_back_into_the_run_config():
    # The model knows kernels, not run configs (attention_choice.py applies a choice to one);
    # perf reads compiled programs, not the training loop or config files.
    code = """
import importlib, pkgutil, sys
import mlembed_jax.model as m
for mod in pkgutil.walk_packages(m.__path__, 'mlembed_jax.model.'):
    importlib.import_module(mod.name)
assert 'mlembed_jax.config' not in sys.modules, 'model imports config'
import mlembed_jax.perf as p
for mod in pkgutil.walk_packages(p.__path__, 'mlembed_jax.perf.'):
    importlib.import_module(mod.name)
assert 'mlembed_jax.train' not in sys.modules, 'perf imports train'
import mlembed_jax.config as c
assert not any(hasattr(sys.modules[n], 'load_config_file') and
               getattr(sys.modules[n], 'load_config_file') is c.load_config_file
               for n in list(sys.modules) if n.startswith('mlembed_jax.perf')), 'perf loads configs'
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
