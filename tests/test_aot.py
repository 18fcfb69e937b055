"""tools/aot_compile.py: the real train step compiled ahead of time for a TPU topology (via
libtpu, no TPU) and for the old GPU planning on fake CPU devices (--gpu_planner=cpu; XLA:GPU
itself: tests/test_aot_gpu.py); the fit/no-fit exit code;
and the pack-local loss lookups that keep global in-batch negatives sharded at scale."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from train_helpers import DEMO, ROOT, SMALL

from mlembed_jax import loss as L
from mlembed_jax.batch import BatchGeometry, globalize_slots
from mlembed_jax.perf import aot, aot_target, hlo, tpu_cost

pytestmark = pytest.mark.integration  # compiles the step for TPU and GPU topologies

TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
LIBTPU = aot_target.find_libtpu()
needs_libtpu = pytest.mark.skipif(
    LIBTPU is None, reason="libtpu is not installed (`make libtpu` puts it in .venv/libtpu; "
    "it is a 200 MB wheel from PyPI), so no TPU topology can be described here")


def run_tool(topology, max_fraction=0.9, flags=(), **overrides):
    args = [sys.executable, TOOL, f"--config={DEMO}", f"--topology={topology}",
            f"--max_fraction={max_fraction}", *flags]
    for k, v in {**SMALL, **overrides}.items():
        args.append(f"--config.{k}={v}")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def gb(text, label):
    """The figure of a '  label  12.34 GB' / 'MB' line of the report, in bytes."""
    m = re.search(rf"^\s+{label}\s+([\d.]+) (GB|MB)", text, re.M)
    assert m, f"no {label!r} line in:\n{text}"
    return float(m.group(1)) * (1e9 if m.group(2) == "GB" else 1e6)


@pytest.mark.slow  # the splash and two-slice compiles below also compile for a TPU and fit
@needs_libtpu
def test_small_config_compiles_for_a_tpu_topology_and_fits():
    r = run_tool("v5p:2x2x1", **{"mesh.fsdp": 2})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "TPU v5p topology 2x2x1 = 4 chips" in out
    assert "mesh: data=2 fsdp=2 tensor=1" in out
    # One pack of 8 samples per chip: the recipe's per-device batch.
    assert "4 packs x 8 samples = 32 samples/step (8 per chip" in out
    # The arguments are this chip's shard of the state (plus a tiny batch shard): at least
    # what the shardings give by hand, more only by XLA:TPU's tile padding of small arrays,
    # and far below the whole state that an unsharded (replicated) layout would hold.
    state = float(re.search(r"train state ([\d.]+) MB", out).group(1)) * 1e6
    assert state <= gb(out, "arguments") <= 1.5 * state, (state, gb(out, "arguments"))
    assert gb(out, "temporaries") > 0
    total = gb(out, "total")
    assert total >= gb(out, "arguments") + gb(out, "temporaries") - 0.05e6
    assert "FITS" in out and "RESULT: fits" in out
    # FSDP over 2 chips and data parallelism: weights and gradients cross chips.
    assert re.search(r"^\s+all-(reduce|gather)\s+\d+", out, re.M), out
    assert "counts the scanned layer body" in out
    # XLA:TPU's own estimate, every layer counted (tests/test_tpu_cost.py checks the method).
    assert "a roofline-type LOWER BOUND on time, not a measurement" in out
    assert re.search(r"^  per step: [\d.e-]+ s: ", out, re.M), out
    assert "MFU on useful tokens at that time" in out


@needs_libtpu
def test_absurd_batch_does_not_fit_and_exits_nonzero():
    # 4096 rows of 2048 tokens per chip: the attention logits alone need ~1 TB per chip.
    r = run_tool("v5p:2x2x1", **{"data.rows_per_pack": 4096, "data.seq_len": 2048,
                                 "data.max_seq_length": 2048})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "does NOT fit" in r.stdout


def test_gpu_planning_on_fake_cpu_devices():
    # Same step, same mesh, 8 fake CPU devices. A tiny HBM fraction makes it "not fit", which
    # checks the tool's own ceiling (XLA:CPU never runs out of memory while compiling).
    r = run_tool("h100:8", **{"mesh.fsdp": 8, "mesh.data": 1}, max_fraction=1e-6,
                 flags=["--gpu_planner=cpu"])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "8 fake CPU devices" in out and "ONLY INDICATIVE" in out
    assert "mesh: data=1 fsdp=8 tensor=1" in out
    assert gb(out, "arguments") > 0 and gb(out, "temporaries") > 0
    assert "DOES NOT FIT" in out and "(indicative only: XLA:CPU)" in out
    # The relayout work of the compiled program, every layer counted (perf/hlo.copy_ops).
    assert re.search(r"^copy/transpose ops in the compiled HLO: \d+ \(\d+ in loops\), run "
                     r"\d+ times per step, [\d.]+ [MG]B written per step", out, re.M), out


def test_bad_topology_is_a_usage_error():
    r = subprocess.run([sys.executable, TOOL, f"--config={DEMO}", "--topology=v9z:2x2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown chip 'v9z'" in r.stderr
    # An unknown config field is one line too, before anything is compiled.
    r = subprocess.run([sys.executable, TOOL, f"--config={DEMO}", "--topology=cpu:8",
                        "--config.model.foo=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown config field 'model.foo'"
    with pytest.raises(aot_target.AotError, match="nodes x GPUs"):
        aot_target.parse_target("h100:eight")
    with pytest.raises(aot_target.AotError, match="device count"):
        aot_target.parse_target("h100:2x8", gpu_planner="cpu")
    t = aot_target.parse_target("v5p:4x4x4")
    assert (t.platform, t.num_devices, t.hbm_bytes) == ("tpu", 64, 95e9)
    t = aot_target.parse_target("v5p:4x4x4", num_slices=2)
    assert (t.num_devices, t.num_slices) == (128, 2)
    with pytest.raises(aot_target.AotError, match="h100:2x8"):
        aot_target.parse_target("h100:16", num_slices=2)
    t = aot_target.parse_target("h100:2x8")
    assert (t.platform, t.num_devices, t.nodes, t.hbm_bytes) == ("gpu", 16, 2, 84942979072)
    t = aot_target.parse_target("h100:8", gpu_planner="cpu")
    assert (t.platform, t.num_devices, t.hbm_bytes) == ("cpu", 8, 80e9)


def test_a_libtpu_other_than_jaxs_pin_is_named_with_the_fix(tmp_path):
    # A libtpu installed as `make libtpu` does (pip --target): the .so beside its dist-info.
    lib = tmp_path / "libtpu" / "libtpu.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    info = tmp_path / "libtpu-0.0.52.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: libtpu\nVersion: 0.0.52\n")
    pin = aot_target.jax_libtpu_requirement()
    assert pin is not None and pin.name == "libtpu"  # jax 0.10.2: libtpu==0.0.42.*
    line = aot_target.check_libtpu(str(lib))
    assert line and "\n" not in line
    assert f"libtpu 0.0.52 does not match jax {jax.__version__}'s pin libtpu{pin.specifier}" \
        in line and "make libtpu" in line
    if LIBTPU is not None:  # the one `make libtpu` installed follows the pin
        assert aot_target.check_libtpu(LIBTPU) is None


def test_the_memory_report_stands_without_the_hlo_text():
    # XLA can fail to print a program it compiled (libtpu 0.0.52 under jax 0.10.2 did, with
    # a RET_CHECK); the report then says so and still gives memory and FLOPs.
    import io

    from train_helpers import small_config

    target = aot_target.parse_target("cpu:8")
    built = aot.build_lowered(small_config(**{"mesh.fsdp": 8, "mesh.data": 1}),
                              aot.target_devices(target))
    compiled = built.lowered.compile()
    out = io.StringIO()
    aot.report(built, compiled, target, 1.0, 0.9, out=out, hlo_text=None,
               hlo_error="XlaRuntimeError: RET_CHECK failure")
    text = out.getvalue()
    assert gb(text, "temporaries") > 0 and "FLOPs per step" in text
    assert "HLO text is unavailable (XlaRuntimeError: RET_CHECK failure)" in text


@pytest.mark.slow  # ~25 s; tests/test_benchmark.py checks the same count by hand
def test_xla_counts_a_lora_step_as_the_hand_count_does():
    """XLA:CPU's cost analysis of the compiled LoRA and full steps (no remat, so no
    recomputed forward) falls by the ratio perf/flops.py counts (measured 0.708 vs 0.703);
    the model is wide and the texts short, so the dense matmuls dominate and the ratio is
    near 2/3. XLA counts the scanned layer body once, in both steps alike."""
    from train_helpers import small_config

    flops, hand = {}, {}
    for rank in (0, 4):
        c = small_config(**{"mesh.num_devices": 1, "model.lora.rank": rank,
                            "model.remat": "none", "model.hidden_size": 256,
                            "model.intermediate_size": 512, "model.head_dim": 64,
                            "data.max_seq_length": 32})
        built = aot.build_lowered(c, jax.devices()[:1])
        flops[rank] = hlo.cost_flops(built.lowered.compile())
        hand[rank] = aot.hand_flops(c, built.step.geometry)["full"]
    assert hand[4] / hand[0] < 0.75
    assert abs(flops[4] / flops[0] - hand[4] / hand[0]) < 0.02, (flops, hand)


# ------------------------------------------------------------------------------------------
# Global in-batch negatives at scale: the pack-local lookups of the loss.


def _random_slots(rng, packs, B=4, N=3, texts=None):
    """A packed batch's slot arrays with pack-local text indices, some slots empty."""
    T = texts or B * (2 + N)
    geo = BatchGeometry(packs=packs, rows_per_pack=1, seq_len=8, texts_per_pack=T,
                        samples_per_pack=B, max_negatives=N)
    b = geo.empty()
    b["text_valid"][:] = rng.random((packs, T)) < 0.9
    b["query_text"][:] = rng.integers(0, T, (packs, B))
    b["positive_text"][:] = rng.integers(0, T, (packs, B))
    b["negative_text"][:] = rng.integers(0, T, (packs, B, N))
    b["negative_valid"][:] = rng.random((packs, B, N)) < 0.8
    b["sample_valid"][:] = rng.random((packs, B)) < 0.85
    b["in_batch"][:] = rng.random((packs, B)) < 0.7
    b["dataset_id"][:] = rng.integers(0, 3, (packs, B))
    return geo, globalize_slots(b, geo)


def _sharded(mesh, pooled, slots):
    row = lambda a: NamedSharding(mesh, P("data", *([None] * (a.ndim - 1))))
    return (jax.device_put(pooled, NamedSharding(mesh, P(None, "data", None))),
            {k: jax.device_put(np.asarray(v), row(np.asarray(v))) for k, v in slots.items()})


def test_pack_local_lookups_give_the_same_loss_and_gradient():
    rng = np.random.default_rng(0)
    geo, slots = _random_slots(rng, packs=8)
    pooled = rng.normal(size=(3, 8 * geo.texts_per_pack, 16)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x, s = _sharded(mesh, pooled, slots)
    # Blocks of 3 rows (strided over the packs), as the size configs use blocks.
    f = lambda x, s, packs: L.nested_contrastive_loss(
        x, s, mrl_min_dim=4, in_batch_block_size=3, num_datasets=3, packs=packs)
    grad = lambda packs: jax.jit(jax.value_and_grad(
        lambda x, s: f(x, s, packs), has_aux=True))(x, s)
    (t0, m0), g0 = grad(None)
    (t1, m1), g1 = grad(8)
    assert float(m0["num_samples"]) > 0 and float(m0["num_in_batch"]) > 0
    np.testing.assert_allclose(t1, t0, rtol=1e-6)
    np.testing.assert_allclose(m1["sample_loss"], m0["sample_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["dataset_loss"], m0["dataset_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)
    assert np.abs(g1).sum() > 0


def test_pack_local_lookups_keep_per_device_memory_down():
    # 64 packs x 10 samples over 8 devices. A global lookup leaves every device with every
    # sample's query, positive and 9 negatives ([E, S, N, d]); pack-local ones keep 1/8 of
    # them per device, and blocks bound the in-batch logits.
    rng = np.random.default_rng(1)
    geo, slots = _random_slots(rng, packs=64, B=10, N=9)
    pooled = jnp.zeros((2, 64 * geo.texts_per_pack, 128), jnp.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x, s = _sharded(mesh, pooled, slots)

    def temp_bytes(packs, block):
        f = lambda x, s: jax.value_and_grad(lambda x: L.nested_contrastive_loss(
            x, s, mrl_min_dim=128, in_batch_block_size=block, packs=packs)[0])(x)
        return jax.jit(f).lower(x, s).compile().memory_analysis().temp_size_in_bytes

    global_lookup = temp_bytes(None, 0)
    local = temp_bytes(64, 0)
    local_blocked = temp_bytes(64, 160)
    assert local < 0.5 * global_lookup, (local, global_lookup)  # measured: 5.5 vs 16 MB
    assert local_blocked <= local, (local_blocked, local)


@needs_libtpu
def test_every_host_of_a_tpu_pod_builds_its_own_packs():
    # v5p:4x4x4 is 16 hosts of 4 chips. The mesh follows the torus, so a host's chips hold
    # pack positions like {0, 4, 8, 12}, not a run; each host still gets 4 packs of its own
    # and together they build every pack of the step once.
    from mlembed_jax.config import load_config_file
    from mlembed_jax.sharding import make_mesh, pack_ranges

    target = aot_target.parse_target("v5p:4x4x4")
    aot_target.prepare_environment(target)
    config = load_config_file(os.path.join(ROOT, "configs", "8b.py"))
    mesh = make_mesh(config.mesh, aot.target_devices(target))
    positions = {}
    for i, d in enumerate(mesh.devices.reshape(-1)):
        positions.setdefault(d.process_index, []).append(i)
    assert len(positions) == 16
    assert any(max(v) - min(v) >= len(v) for v in positions.values())  # not contiguous
    ranges = pack_ranges(mesh, config.mesh.logical_axis_rules, 64)
    assert sorted(ranges.values()) == [(4 * r, 4 * r + 4) for r in range(16)]


# ------------------------------------------------------------------------------------------
# The fast path on TPU: splash through the real step, one slice and two.

SPLASH_ROWS = {"data.seq_len": 128, "data.max_seq_length": 128}


@needs_libtpu
def test_auto_compiles_splash_for_a_tpu_and_keeps_its_residuals(tmp_path):
    hlo_file = tmp_path / "step.hlo"
    r = run_tool("v5p:2x2x1", flags=[f"--hlo_out={hlo_file}", "--predict_time=false"],
                 **{"mesh.fsdp": 2, "model.attention": "auto", "model.remat": "auto",
                    **SPLASH_ROWS})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "attention: splash (auto: the TPU Pallas splash kernel" in out
    assert "remat attention, attention splash" in out and "FITS" in out
    text = hlo_file.read_text()
    calls = [line for line in text.splitlines() if " custom-call(" in line]
    kinds = {k for k in ("fwd", "dq", "dkv")
             for line in calls if f"splash_mqa_{k}_segmented" in line}
    assert kinds == {"fwd", "dq", "dkv"}, calls[:3]
    # remat "attention" keeps the forward's residuals: one forward kernel, never rerun in
    # the backward pass (remat "full" compiles it twice).
    assert sum("splash_mqa_fwd_segmented" in line for line in calls) == 1
    # The splash kernels' multi-line metadata inside the layer loop no longer cuts the loop
    # short: the per-layer FSDP gathers are counted in it.
    assert any(c.in_loop and c.kind == "all-gather" for c in hlo.collectives(text))


@needs_libtpu
def test_two_slices_only_reduce_gradients_over_dcn():
    # Two described v5p:2x2x1 slices (one host of 4 chips each); the FSDP layout, as the big
    # configs use: data=1 fsdp=-1 per slice, so data=2 (one per slice) x fsdp=4.
    import io

    from train_helpers import small_config

    target = aot_target.parse_target("v5p:2x2x1", num_slices=2)
    aot_target.prepare_environment(target)
    config = small_config(**{"mesh.data": 1, "mesh.fsdp": -1, "model.attention": "auto",
                             **SPLASH_ROWS})
    devices = aot.target_devices(target)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    built = aot.build_lowered(config, devices)
    mesh = built.step.mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in row.ravel()} for row in mesh.devices] == [{0}, {1}]
    compiled = built.lowered.compile()
    text = compiled.as_text()
    out = io.StringIO()
    assert aot.report(built, compiled, target, 1.0, 0.9, out=out, hlo_text=text)
    report = out.getvalue()
    assert "2 slices x TPU v5p topology 2x2x1 = 8 chips joined by DCN" in report
    assert "(data = 2 slices x 1; fsdp and tensor inside a slice)" in report
    assert "hosts: 2 processes (4 chips each), each building 4 pack(s)" in report
    assert "collectives across slices (DCN" in report
    # The slice-index read (SliceId) carries XLA's -1 "unknown" marker: added back, the
    # predicted time is a real (positive) figure, as for one slice.
    assert 'custom_call_target="SliceId"' in text
    assert tpu_cost.optimal_seconds(compiled, text) > 0

    sends = hlo.dcn_transfers(text)
    assert sends and all(t.slices == [[0, 1]] for t in sends)
    assert {t.kind for t in sends} == {"ALL_REDUCE", "ALL_GATHER"}
    # Inside the layer scan only gradients may cross DCN (all-reduced); FSDP's weight
    # gathers stay inside a slice: an FSDP axis over DCN would put ALL_GATHERs here.
    assert all(t.kind == "ALL_REDUCE" and t.reduce == "SUM" for t in sends if t.in_loop)
    # The gradient all-reduce: XLA reduce-scatters the gradients inside a slice first, so
    # each chip sends at least its quarter of all fp32 gradients (4 chips per slice), and
    # at most all of them once (measured: 316 KB of 829 KB; quarter 207 KB).
    params = sum(int(np.prod(x.shape)) for x in
                 jax.tree_util.tree_leaves(built.step.abstract_state.params))
    layers = config.model.num_layers
    reduced = sum(t.bytes * (layers if t.in_loop else 1) for t in sends if t.kind == "ALL_REDUCE")
    assert params * 4 / 4 <= reduced <= params * 4, (reduced, params)
    # The only gathers: this chip's pooled embeddings (and their valid flags) for the
    # global in-batch negatives, once per step: [exits, sample slots of this chip, dims].
    exits = len(built.step.setup.enc.exits)
    slots = built.step.geometry.packs * built.step.geometry.samples_per_pack // len(devices)
    hidden = built.step.setup.enc.hidden_size
    for t in sends:
        if t.kind == "ALL_GATHER":
            assert not t.in_loop and t.bytes <= exits * slots * hidden * 4, t
