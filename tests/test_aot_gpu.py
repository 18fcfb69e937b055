"""tools/aot_compile.py for NVIDIA GPUs: the real train step compiled by XLA:GPU on this CPU
(JAX's CUDA plugin describes the GPUs from XLA's specs; no GPU, no driver), its memory
against the HBM a JAX process gets, the over-budget exit, and what crosses nodes."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from train_helpers import DEMO, ROOT, SMALL

from mlembed_jax.perf import aot_target, gpu_aot, gpu_target

pytestmark = pytest.mark.integration  # compiles the train step with XLA:GPU in subprocesses

TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
needs_plugin = pytest.mark.skipif(
    not aot_target.cuda_plugin_installed(),
    reason="jax's CUDA plugin is not installed (`make gpu-aot`, which `make test` runs, puts "
    "it in .venv/gpu-aot), so no GPU can be described here")


def run_tool(*args, config=DEMO, env=None, **overrides):
    cmd = [sys.executable, TOOL, f"--config={config}", *args]
    for k, v in overrides.items():
        cmd.append(f"--config.{k}={v}")
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "JAX_PLATFORMS", gpu_target.MEM_FRACTION_ENV)}
    return subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=900)


def gb(text, label):
    m = re.search(rf"^\s+{label}\s+([\d.]+) (GB|MB)", text, re.M)
    assert m, f"no {label!r} line in:\n{text}"
    return float(m.group(1)) * (1e9 if m.group(2) == "GB" else 1e6)


def test_specs_ship_with_the_package_and_parse():
    # Figures from XLA's spec files (gpu_specs/*.txtpb, device_memory_size).
    h100, h200, b200 = (gpu_target.load(n) for n in ("h100", "h200", "b200"))
    assert (h100.device_name, h100.compute_capability, h100.hbm_bytes) == (
        "NVIDIA H100 80GB HBM3", "9.0", 84942979072)
    assert (h200.hbm_bytes, b200.compute_capability) == (151397597184, "10.0")
    # jaxlib 0.10.2 rejects this newer field: it is commented out in every shipped file.
    assert not re.search(r"^\s*collective_memory_granularity:", h100.text, re.M)
    assert gpu_target.mem_fraction({}) == (0.75, "JAX's default preallocation")
    assert gpu_target.mem_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"})[0] == 0.9
    with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='1.5'"):
        gpu_target.mem_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": "1.5"})


def test_iota_replica_groups_read_as_xla_writes_them():
    # XLA's iota form [groups,size]<=[dims]T(perm): iota over dims, transposed, reshaped.
    # [2,4]<=[4,2]T(1,0): iota [[0,1],[2,3],[4,5],[6,7]] transposed -> [[0,2,4,6],[1,3,5,7]].
    assert gpu_aot.replica_groups("x, replica_groups=[2,4]<=[4,2]T(1,0), y") == [
        [0, 2, 4, 6], [1, 3, 5, 7]]
    assert gpu_aot.replica_groups("replica_groups=[2,2]<=[4]") == [[0, 1], [2, 3]]
    assert gpu_aot.replica_groups("replica_groups={{0,2},{1,3}}") == [[0, 2], [1, 3]]
    assert gpu_aot.replica_groups("source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]
    assert gpu_aot.replica_groups("all-reduce(x), to_apply=%add") is None
    # The mesh form: devices [[0,2],[1,3]] (iota [2,2] transposed) on axes of sizes 1, 2, 2;
    # a group along axis_1 holds the devices that differ in axis_1 only.
    line = ("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], device_ids=([2,2]T(1,0)) "
            "{'axis_1'}, use_global_device_ids=true")
    assert gpu_aot.replica_groups(line) == [[0, 1], [2, 3]]
    assert gpu_aot.replica_groups(line.replace("{'axis_1'}", "{'axis_2'}")) == [[0, 2], [1, 3]]
    assert gpu_aot.replica_groups("replica_groups=mesh['axis_0'=4] {'axis_0'}") == [
        [0, 1, 2, 3]]


def test_unknown_gpu_is_one_line_naming_the_known_ones():
    r = run_tool("--topology=a200:8")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "unknown chip 'a200'" in line
    assert "['b200', 'h100', 'h100_pcie', 'h100_sxm', 'h200']" in line


@needs_plugin  # the fraction is read once the GPU is described
def test_a_bad_memory_fraction_is_one_line():
    r = run_tool("--topology=h100:8", env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "lots"})
    assert r.returncode == 2 and "XLA_PYTHON_CLIENT_MEM_FRACTION='lots'" in r.stderr


@needs_plugin
def test_two_nodes_report_what_crosses_and_over_budget_exits_nonzero_with_knobs():
    # 2 nodes x 2 GPUs, a tiny model: FSDP inside a node, data parallel across the two. The
    # memory fraction is set below the tiny step's size: the budget check is ours (XLA:GPU
    # never reports running out of memory), so this is the path a too-big step takes.
    r = run_tool("--topology=h100:2x2", **SMALL, **{"mesh.fsdp": -1, "mesh.data": 1},
                 env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.0000001"})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "target: 2 nodes x 2 NVIDIA H100 80GB HBM3" in out and "XLA:GPU" in out
    assert "mesh: data=2 fsdp=2 tensor=1" in out
    assert "hosts: 2 processes (2 chips each)" in out
    cross = out[out.index("collectives across nodes"):]
    # Per layer, gradients are reduced across nodes but the weights are gathered (FSDP)
    # inside a node only: no per-layer all-gather crosses, while the whole program has them.
    assert re.search(r"^\s+all-reduce\s+\d+ .*per layer", cross, re.M), cross
    assert not re.search(r"^\s+all-gather\s+\d+ .*per layer", cross, re.M), cross
    assert re.search(r"^\s+all-gather\s+\d+ \([1-9]\d* in loop\)", out, re.M), out
    assert "GB per GPU per step across nodes" in cross
    # Over the budget: the numbers, and what would help.
    assert "DOES NOT FIT in 0% of HBM" in out and "this run's budget" in out
    assert "FITS in 75% of HBM" in out  # JAX's default, printed beside the env's fraction
    assert re.search(r"RESULT: does NOT fit: [\d.]+ GB per GPU \(arguments", out)
    assert "model.remat=full (now none)" in out and "train.grad_cache_chunks=K" in out



@needs_plugin
def test_auto_passes_over_kernels_that_do_not_compile_for_the_gpu():
    # The small config computes in float32, which neither flash kernel takes (tokamax's
    # Mosaic kernel and cuDNN refuse it while compiling): auto says so and takes dense, as a
    # run's start-up check would; asked for by name, the kernel is a one-line error.
    r = run_tool("--topology=h100:1", **SMALL, **{"model.attention": "auto"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = re.search(r"^attention: .*$", r.stdout, re.M).group(0)
    assert line.startswith("attention: dense (auto:"), line
    assert "passed over cudnn: does not compile for the NVIDIA H100 80GB HBM3" in line
    if importlib.util.find_spec("tokamax") is not None:
        assert "passed over tokamax_mosaic: does not compile for the NVIDIA H100" in line
    r = run_tool("--topology=h100:1", **SMALL, **{"model.attention": "cudnn"})
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: model.attention='cudnn' does not compile for the NVIDIA "
                          "H100 80GB HBM3: ") and "pick another kernel" in err, r.stderr[-2000:]

def readme_cpu_planning_total(config="0.6B", target="1x H100") -> float:
    """The total per chip of the README's XLA:CPU planning row for `config` on `target`
    ("### Memory and FLOPs per configuration"), in bytes."""
    with open(os.path.join(ROOT, "README.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")]
            if (len(cells) > 7 and cells[1] == config and cells[2].startswith(target)
                    and cells[3].startswith("XLA:CPU planning")):
                return float(re.search(r"\*\*([\d.]+) GB\*\*", line).group(1)) * 1e9
    raise AssertionError(f"no XLA:CPU planning row for {config} on {target} in README.md")


@needs_plugin
def test_06b_step_compiles_for_an_h100_with_the_kernel_auto_picks_and_fits(tmp_path):
    # The 0.6B config as it is (attention=auto), with remat=full as the XLA:CPU planning row
    # was compiled, so the two memory figures are of the same program but for the kernel.
    hlo_out = tmp_path / "step.hlo"
    r = run_tool("--topology=h100:1", f"--hlo_out={hlo_out}",
                 config=os.path.join(ROOT, "configs", "0.6b.py"), **{"model.remat": "full"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # auto on a Hopper GPU: tokamax's Mosaic GPU kernel when tokamax is installed, else cuDNN
    # (mlembed_jax/model/kernel_choice.py); either way a custom call XLA:GPU compiled in.
    kernel = re.search(r"^attention: (\w+) \(auto", out, re.M).group(1)
    hlo = hlo_out.read_text()
    if importlib.util.find_spec("tokamax") is not None:
        assert kernel == "tokamax_mosaic"
        assert 'custom_call_target="mosaic_gpu' in hlo
    else:
        assert kernel == "cudnn"
        assert 'custom_call_target="__cudnn$fmha' in hlo
    assert "RESULT: fits" in out and "FITS in 75% of HBM" in out
    total = gb(out, "total")
    assert gb(out, "arguments") > 6e9  # 519M f32 parameters + AdamW moments: 6.23 GB
    # Below what XLA:CPU planned for the same step (README row, --gpu_planner=cpu).
    assert total < readme_cpu_planning_total(), (total, readme_cpu_planning_total())


@needs_plugin
def test_benchmark_preflight_compiles_deviceless_and_fails_on_a_misfit(tmp_path):
    # tools/gpu_benchmark.sh --preflight: the CPU smoke configuration, first program only.
    def preflight(out, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        base.update(MLEMBED_BENCH_SMOKE="1", OUT=str(out), PYTHON=sys.executable,
                    MLEMBED_PREFLIGHT_LIMIT="1", PYTHONPATH=ROOT, **env)
        r = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_benchmark.sh"),
                            "--preflight", "--gpu=h200"], cwd=ROOT, env=base,
                           capture_output=True, text=True, timeout=600)
        return r, (out / "all.txt").read_text()

    r, log = preflight(tmp_path / "ok")
    assert r.returncode == 0, log + r.stderr[-2000:]
    assert "1 programs for h200, XLA:GPU on the CPU" in log
    assert "[exit 0] --config=configs/tiny.py --config.model.attention=tokamax_xla" in log
    assert "RESULT: fits" in log and "NVIDIA H200 141GB HBM3e" in log
    assert "== preflight passed" in log
    # A budget nothing fits in: the program is over it, so the preflight fails.
    r, log = preflight(tmp_path / "over", XLA_PYTHON_CLIENT_MEM_FRACTION="0.0000001")
    assert r.returncode == 1, log + r.stderr[-2000:]
    assert "[exit 1]" in log and "RESULT: does NOT fit" in log and "== preflight FAILED" in log


# Traces the gradient of a 3-layer encoder with tokamax's Mosaic GPU kernel for a described
# H100 (no compile) and prints the per-layer stacks [layers=3, rows=5, 1, 128, 128] of the
# same-text mask that the backward pass would keep, one line per remat policy.
_MASK_STACKS = """
import dataclasses, re, sys
from mlembed_jax.perf import aot_target
target = aot_target.parse_target("h100:1")
aot_target.prepare_environment(target)
import jax, jax.numpy as jnp
from mlembed_jax.model.encoder import abstract_params, encode
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.perf import gpu_aot
dev = gpu_aot.devices(target)
sh = jax.sharding.SingleDeviceSharding(dev[0])
cfg = EncoderConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=128, exits=(1, 3),
                    compute_dtype="bfloat16", attention="tokamax_mosaic")
params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      abstract_params(cfg))
rows = jax.ShapeDtypeStruct((5, 128), jnp.int32, sharding=sh)
pool = jax.ShapeDtypeStruct((1, 5), jnp.int32, sharding=sh)
for remat in ("none", "attention", "full"):
    c = dataclasses.replace(cfg, remat=remat)
    loss = lambda p, *a: jnp.sum(encode(p, c, *a)["pooled"])
    with gpu_aot.tracing_for(dev):
        text = str(jax.make_jaxpr(jax.grad(loss))(params, rows, rows, rows, pool))
    assert "bool[5,1,128,128]" in text  # the mask is there to be found
    print(remat, sorted(set(re.findall(r"bool\\[3,5,1,128,128\\]", text))))
"""


@needs_plugin
def test_mosaic_backward_keeps_no_per_layer_copy_of_the_mask():
    # The mask is the same for every layer; before it was built once outside the layer loop
    # (and handed to tokamax as itself, not its batching wrapper's copy), remat none and
    # attention saved one per layer: pred[28, 24, 1, 1024, 1024], 0.70 GB, at 0.6B.
    r = subprocess.run([sys.executable, "-c", _MASK_STACKS], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:3] == ["none []", "attention []", "full []"], r.stdout
