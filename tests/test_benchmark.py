"""The benchmark tool: a CPU smoke run (no timing assertions) and its FLOP count by hand."""

import os
import subprocess
import sys

import ml_collections
import pytest
from tool_helpers import load_tool
from train_helpers import ROOT, subprocess_env

from mlembed_jax.perf.flops import mfu, non_embedding_params, train_flops


def test_flop_count_matches_hand_count():
    m = ml_collections.ConfigDict(dict(hidden_size=64, intermediate_size=128, num_layers=4,
                                       num_heads=4, num_kv_heads=2, head_dim=16))
    # Per layer: q 64x64 + k,v 2 x 64x32 + o 64x64 = 12,288; q/k norms 2x16 = 32;
    # MLP 3 x 64x128 = 24,576; two layer norms 2x64 = 128  -> 37,024.
    # Four layers 148,096, plus the final norm 64 -> 148,160.
    assert non_embedding_params(m) == 148_160
    # Texts of 3 and 5 tokens: 8 tokens x 6 x 148,160 = 7,111,680 dense FLOPs.
    # Attention pairs: 3*4/2 + 5*6/2 = 6 + 15 = 21 visible (query, key) pairs; per pair and
    # layer 2 matmuls x 2 FLOPs x 4 heads x 16 dims = 256 forward, x3 for the backward:
    # 21 x 256 x 3 x 4 layers = 64,512.
    assert train_flops(m, [3, 5]) == 7_111_680 + 64_512
    # MFU against the datasheet peak (989 TFLOP/s for an H100): half of 2 chips' peak in 1 s.
    assert mfu(989e12, 1.0, "NVIDIA H100 80GB HBM3", devices=2) == 0.5
    assert mfu(1e12, 1.0, "cpu") is None


def test_lora_flop_count_matches_hand_count():
    """With LoRA the frozen base costs 4 N per token (no weight gradients) and the adapters
    6 A; the attention scores are counted as without LoRA (their backward is unchanged)."""
    import jax

    from mlembed_jax.model import lora
    from mlembed_jax.model.encoder import abstract_params
    from mlembed_jax.model.qwen3 import EncoderConfig
    from mlembed_jax.perf.flops import lora_params

    shapes = dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=16)
    m = ml_collections.ConfigDict(dict(shapes, lora=dict(rank=2, targets=tuple(lora.TARGETS))))
    # r (in + out) per projection: q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128,
    # up 64+128, down 128+64 = 1,024; x rank 2 x 4 layers = 8,192.
    assert lora_params(m) == 8_192
    # The adapters model/lora.py actually makes for this model have that many parameters.
    enc = EncoderConfig(vocab_size=256, **shapes)
    ad = jax.eval_shape(lambda: lora.init_adapters(abstract_params(enc), lora.LoraConfig(
        rank=2, alpha=8.0), jax.random.key(0)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(ad)) == 8_192
    # Texts of 3 and 5 tokens: 8 x (4 x 148,160 + 6 x 8,192) = 8 x 641,792 = 5,134,336,
    # plus the same 64,512 of attention as test_flop_count_matches_hand_count.
    assert train_flops(m, [3, 5]) == 5_134_336 + 64_512
    assert train_flops(m, [3, 5], lora=False) == 7_111_680 + 64_512  # the torch reference
    m.lora.rank = 0
    assert train_flops(m, [3, 5]) == 7_111_680 + 64_512
    m.lora.rank, m.lora.targets = 2, ("q_proj", "v_proj")
    assert lora_params(m) == 2 * 4 * (128 + 96)


def test_benchmark_variant_rows_report_bad_fields_without_stopping(capsys):
    """A variant with a bad value becomes an error row; the syntax is checked up front.
    (The timed paths, baseline, plain, profile and variants, run in the script smoke test.)"""
    benchmark = load_tool("benchmark")

    from mlembed_jax.config import ConfigError, base_config

    assert benchmark.parse_variant("model.remat=none, model.attention=cudnn") == {
        "model.remat": "none", "model.attention": "cudnn"}
    with pytest.raises(ConfigError, match="only model.\\*, loss.\\*, optim.\\* and "):
        benchmark.parse_variant("data.seq_len=3")
    with pytest.raises(ConfigError, match="write field=value"):
        benchmark.parse_variant("model.remat")
    benchmark.run_variant(base_config(), "model.remat=bogus", None, None, None)
    row = capsys.readouterr().out.strip()
    assert row.startswith("| variant model.remat=bogus | error: invalid config: "
                          "model.remat='bogus' must be one of"), row


@pytest.mark.integration
@pytest.mark.slow  # stage 2 of the GPU script's smoke runs the same tool
def test_attention_bench_cpu_smoke():
    args = [sys.executable, os.path.join(ROOT, "tools", "bench_attention.py"), "--seq_len=128",
            "--rows=64", "--heads=4", "--kv_heads=2", "--head_dim=32", "--steps=2",
            "--kernels=dense,xla_sdpa,tokamax_xla,cudnn"]
    out = subprocess.run(args, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {ln.split("|")[1].strip(): ln for ln in out.stdout.splitlines()
            if ln.startswith("| ")}
    for name in ("dense", "xla_sdpa", "tokamax_xla"):
        assert rows[name].rstrip().endswith("| no |"), rows[name]
    assert "skipped: model.attention='cudnn' runs on NVIDIA GPUs only" in rows["cudnn"]


def test_attention_bench_flags_a_kernel_that_crosses_texts(monkeypatch):
    """The cross-text check must catch plain causal attention that ignores segment ids."""
    import jax.numpy as jnp
    import numpy as np

    bench_attention = load_tool("bench_attention")

    from mlembed_jax.model import attention

    def leaky(q, k, v, segment_ids):
        return attention.dense_masked_attention(q, k, v, jnp.ones_like(segment_ids))

    monkeypatch.setitem(attention.ATTENTION_IMPLS, "leaky", leaky)
    seg, _ = bench_attention.mix_rows(128, 64, 0)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(64, 128, h, 16)), jnp.float32) for h in (2, 1, 1))
    assert bench_attention.bench_kernel("leaky", q, k, v, seg, 1)[3] is True
    assert bench_attention.bench_kernel("dense", q, k, v, seg, 1)[3] is False


@pytest.mark.integration
@pytest.mark.slow  # ~3 min; run it (make test-all) before taking the script to a GPU
def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    """tools/gpu_benchmark.sh is meant to run once on a GPU machine, so its every stage runs
    here first (tiny shapes, portable kernels standing in for the GPU ones)."""
    env = subprocess_env(1)
    env.update(MLEMBED_BENCH_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_benchmark.sh")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "all.txt").read_text()
    assert out.returncode == 0, log[-3000:] + out.stderr[-2000:]
    assert " exited " not in log, log
    assert "full-step attention kernel: tokamax_xla (fast kernel passed its checks: 1)" in log
    assert log.count("speed-up in useful tokens/s:") == 2  # the small and the big model
    assert "3D-ML overhead over plain:" in log and "profile of 3 steps" in log
    assert "| category | calls | total ms | % op time |" in log
    rows = [ln for ln in log.splitlines() if ln.startswith(("| mlembed_jax", "| reference"))]
    assert len(rows) == 3 + 2 + 1, rows  # small: ours, plain, ref; big: ours, ref; choices
    assert "jax " in log and "flax " in log
    assert "== bench_small_choices" in log and "== done in" in log
    assert log.count("| variant ") == 5, log


def test_benchmark_says_which_rows_per_pack_fits_the_mix():
    """The demo derives its row buckets for the mix; buckets given too small for it are one
    line naming the rows_per_pack that fits, and that one works."""
    from mlembed_jax.config import ConfigError, apply_overrides, load_config_file
    from mlembed_jax.perf.benchmark import make_batches

    demo = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    geometries, batches = make_batches(demo, steps=2)  # derived buckets: it fits
    assert len(batches) == 2 and geometries
    small = apply_overrides(demo.copy_and_resolve_references(), {"data.rows_per_pack": "(4,)"})
    with pytest.raises(ConfigError, match=r"needs (\d+) rows per pack, more than the largest "
                                          r"bucket data.rows_per_pack=4; pass "
                                          r"--config.data.rows_per_pack=\d+") as e:
        make_batches(small, steps=2)
    need = int(str(e.value).split(" needs ")[1].split()[0])
    fits = apply_overrides(demo.copy_and_resolve_references(),
                           {"data.rows_per_pack": f"({need},)"})
    assert len(make_batches(fits, steps=2)[1]) == 2


@pytest.mark.integration  # compiles and runs the LoRA step (~10 s)
def test_a_lora_step_is_timed_on_a_random_base():
    """With model.lora.rank > 0 the benchmark passes a random frozen base to every step, as
    training passes the loaded one: the adapters train, the base does not."""
    from train_helpers import small_config

    from mlembed_jax.perf.benchmark import make_batches, run_jax

    config = small_config(**{"model.lora.rank": 4, "mesh.num_devices": 1})
    geometries, batches = make_batches(config, steps=3)
    result = run_jax(config, batches, geometries, warmup=1)
    assert len(result.step_times) == 2 and all(t > 0 for t in result.step_times)
