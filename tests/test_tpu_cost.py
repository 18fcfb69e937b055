"""perf/tpu_cost.py: XLA:TPU's predicted step time from a deviceless compile (libtpu), the
layer loop accounted for."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from train_helpers import small_config

from mlembed_jax.perf import aot, aot_target, tpu_cost
from mlembed_jax.perf.flops import CHIPS_BY_NAME

needs_libtpu = pytest.mark.skipif(
    aot_target.find_libtpu() is None,
    reason="libtpu is not installed (`make libtpu`), so no TPU topology can be described here")


def test_per_step_arithmetic_by_hand():
    # T(2) = 5, T(3) = 7: a layer costs 2 and the rest 1; 36 layers -> 1 + 36 x 2 = 73.
    assert tpu_cost.per_step_seconds(5.0, 7.0, 36) == (73.0, 2.0)
    # Four cached-gradient chunks run the layer stack 4 times: 1 + 144 x 2.
    assert tpu_cost.per_step_seconds(5.0, 7.0, 36, chunks=4) == (289.0, 2.0)
    c = tpu_cost.shallow_config(small_config(**{"model.num_layers": 4}), 3)
    assert (c.model.num_layers, tuple(c.model.exits), c.model.scan_unroll) == (3, (3,), 3)


def test_bookkeeping_custom_calls_are_counted_and_kernels_are_not():
    # As libtpu 0.0.42 prints them in the 0.6B v6e step: a ConcatBitcast joining two async
    # slices, a ZeroCrop, and splash's kernel (tpu_custom_call, which carries its own cost).
    text = "\n".join([
        '  %custom-call.52 = bf16[21,1024,1,128]{3,1,0,2} custom-call(%slice-done.146, '
        '%slice-done.147), custom_call_target="ConcatBitcast"',
        '  %zc = f32[8]{0} custom-call(%x), custom_call_target="ZeroCrop"',
        '  %splash = f32[8]{0} custom-call(%q), custom_call_target="tpu_custom_call"',
        # A two-slice program reads its slice's index once.
        '  %sid = u32[] custom-call(), custom_call_target="SliceId"',
    ])
    assert tpu_cost.unknown_cost_calls(text) == 3


def _target(spec):
    target = aot_target.parse_target(spec)
    aot_target.prepare_environment(target)
    return target, aot.target_devices(target)


@needs_libtpu
@pytest.mark.integration  # compiles for a TPU through libtpu
def test_a_bf16_matmul_is_predicted_near_the_chips_peak():
    # 8192^3 x 2 FLOPs on one v5p chip: 1.0995e12 / 459e12 FLOP/s (the datasheet peak, as
    # perf/flops.py has it) = 2.40 ms at peak. A roofline estimate cannot beat the peak, and
    # for a matmul this large it should not be far above it (libtpu 0.0.42: 2.79 ms).
    _, devices = _target("v5p:2x2x1")
    a = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16,
                             sharding=NamedSharding(Mesh(devices[:1], ("x",)), P()))
    compiled = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    at_peak = 2 * 8192 ** 3 / CHIPS_BY_NAME["v5p"].peak_flops
    seconds = tpu_cost.optimal_seconds(compiled)
    assert at_peak <= seconds <= 1.25 * at_peak, (seconds, at_peak)


@needs_libtpu
@pytest.mark.integration  # compiles for a TPU through libtpu
def test_straight_line_copies_predict_the_fully_unrolled_step():
    # The real train step of a 4-layer model (one exit, so the shallow copies score the same
    # loss): the estimate from the 2- and 3-layer straight-line copies must agree with the
    # 4-layer program compiled with its layer loop fully unrolled.
    _, devices = _target("v5p:2x2x1")
    config = small_config(**{"model.num_layers": 4, "model.exits": (4,), "mesh.fsdp": 2})
    built = aot.build_lowered(config, devices)
    compiled = built.lowered.compile()
    raw = compiled.cost_analysis()[tpu_cost.OPTIMAL_SECONDS]
    # The MEL gradient's SparseCore offload and a ZeroCrop carry XLA's -1 "unknown" marker.
    assert raw < 0 and tpu_cost.unknown_cost_calls(compiled.as_text()) >= 1
    pred = tpu_cost.predict(config, devices, compiled)
    assert isinstance(pred, tpu_cost.Prediction), pred
    unrolled = aot.build_lowered(tpu_cost.shallow_config(config, 4), devices)
    full = tpu_cost.optimal_seconds(unrolled.lowered.compile())
    assert abs(pred.seconds - full) <= 0.05 * full, (pred, full)
    # The scanned program's own figure counts one layer of four.
    assert pred.scanned < 0.6 * full
    lines = tpu_cost.report_lines(pred, {"mix": 8.6e9, "mix_tokens": 17_492}, 4, 459e12)
    assert "LOWER BOUND" in lines[0] and "not a measurement" in lines[0]
    assert f"{17_492 / pred.seconds:,.0f}" in lines[2] and "MFU on useful tokens" in lines[3]


@pytest.mark.slow  # six compiles; the method is checked on the plain step above
@needs_libtpu
def test_the_cached_gradient_step_is_predicted_one_forward_pass_slower():
    # Two chunks per step: the same work plus one more forward pass (a third of forward +
    # backward), so between the plain step's time and 1.5x it.
    _, devices = _target("v5p:2x2x1")
    times = {}
    for chunks in (0, 2):
        config = small_config(**{"mesh.fsdp": 2, "train.grad_cache_chunks": chunks,
                                 "data.packs_per_step": 8})
        built = aot.build_lowered(config, devices)
        pred = tpu_cost.predict(config, devices, built.lowered.compile())
        assert isinstance(pred, tpu_cost.Prediction), pred
        times[chunks] = pred.seconds
    assert times[0] < times[2] < 1.5 * times[0], times
