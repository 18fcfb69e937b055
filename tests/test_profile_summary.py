"""mlembed_jax/perf/profile_summary.py and its CLI: a hand-built GPU-like trace with known
numbers, a real CPU trace from jax.profiler, and the CLI's error path."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mlembed_jax.perf.profile_summary import category, find_trace, format_summary, op_times

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "profile_summary.py")
DEV, HOST = 1, 2


def _x(pid, ts, dur, name, op=None, module="jit_train_step"):
    args = {} if op is None else {"hlo_op": op, "hlo_module": module}
    return {"ph": "X", "pid": pid, "tid": 7, "ts": ts, "dur": dur, "name": name, "args": args}


def _write_trace(path, events):
    meta = [{"ph": "M", "pid": DEV, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": DEV, "tid": 7, "name": "thread_name",
             "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": HOST, "name": "process_name", "args": {"name": "/host:CPU"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": meta + events}, f)


@pytest.fixture
def gpu_trace(tmp_path):
    # Device op time by hand (us):
    #   custom-call.1  matmul      300 + 300 = 600  (by its cublas kernel name)
    #   custom-call.2  attention   200              (cudnn)
    #   custom-call.3  attention   150              (flash kernel, a cutlass template)
    #   all-reduce     collective  100
    #   transpose      copy/trans   40
    #   reduce         other        40
    #   fusion.9       other        70              (jit_eval_step)
    # total 1200 over span 0..1500 -> busy 0.8. The memcpy has no hlo_op and the host
    # event is on the host, so neither counts.
    path = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    _write_trace(path, [
        _x(DEV, 0, 300, "sm90_xmma_gemm_bf16bf16_bf16f32", "custom-call.1"),
        _x(DEV, 300, 200, "cudnn_generated_fort_native_sdpa_sm90", "custom-call.2"),
        _x(DEV, 500, 100, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all-reduce-start.1"),
        _x(DEV, 600, 40, "loop_transpose_fusion", "loop_transpose_fusion"),
        _x(DEV, 650, 40, "input_reduce_fusion", "input_reduce_fusion"),
        _x(DEV, 1000, 300, "sm90_xmma_gemm_bf16bf16_bf16f32", "custom-call.1"),
        _x(DEV, 1300, 150, "void flash::flash_fwd_kernel<cutlass::half_t>", "custom-call.3"),
        _x(DEV, 1430, 70, "fusion.9", "fusion.9", module="jit_eval_step"),
        _x(DEV, 2000, 1000, "MemcpyH2D"),
        _x(HOST, 0, 5000, "custom-call.1", "custom-call.1"),
    ])
    return tmp_path


def _rows(table_text):
    """Markdown table rows (header and rule skipped) as lists of stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in table_text.splitlines()[2:] if line.startswith("|")]


def test_hand_built_trace_totals_and_categories(gpu_trace):
    t = op_times(find_trace(str(gpu_trace)))
    assert t.processes == ["/device:GPU:0"]  # host event ignored
    assert t.total_us == 1200 and t.span_us == 1500
    assert (t.ops["custom-call.1"].calls, t.ops["custom-call.1"].us) == (2, 600)
    assert t.modules == {"jit_train_step": 1130, "jit_eval_step": 70}

    text = format_summary(t, top=3)
    ops_table, cat_table, last = text.split("\n\n")[1:]
    assert _rows(ops_table) == [
        ["custom-call.1", "matmul", "2", "0.600", "50.0%", "sm90_xmma_gemm_bf16bf16_bf16f32"],
        ["custom-call.2", "attention", "1", "0.200", "16.7%",
         "cudnn_generated_fort_native_sdpa_sm90"],
        ["custom-call.3", "attention", "1", "0.150", "12.5%",
         "void flash::flash_fwd_kernel<cutlass::half_t>"],
        ["(4 more ops)", "", "", "", "", ""]]
    # attention 200 + 150 = 350 of 1200 = 29.2%; other 40 + 70 = 110 = 9.2%
    assert _rows(cat_table) == [
        ["matmul", "2", "0.600", "50.0%"], ["attention", "2", "0.350", "29.2%"],
        ["other fusion/op", "2", "0.110", "9.2%"], ["collective", "1", "0.100", "8.3%"],
        ["copy/transpose", "1", "0.040", "3.3%"]]
    assert last == "op time 1.200 ms over span 1.500 ms: busy 0.80 (summed over /device:GPU:0)"


def test_module_filter(gpu_trace):
    # Without fusion.9 (jit_eval_step): 1130 us over span 0..1450 (the flash kernel's end).
    t = op_times(find_trace(str(gpu_trace)), module_contains="train_step")
    assert "fusion.9" not in t.ops and t.total_us == 1130 and t.span_us == 1450
    with pytest.raises(ValueError, match="no XLA op events with hlo_module containing"):
        op_times(find_trace(str(gpu_trace)), module_contains="nope")


def test_category_keywords():
    assert category("custom-call.4", "nvjet_tst_128x256_64x4") == "matmul"
    assert category("all-gather-start", "ncclDevKernel_AllGather") == "collective"
    assert category("copy.3") == "copy/transpose"
    assert category("loop_add_fusion") == "other fusion/op"
    # XLA:CPU names (a tiny-config train step's trace, jax 0.10.2).
    assert category("ynn_fusion.30") == "ynn (CPU dots, reductions)"
    assert category("wrapped_broadcast.19") == "broadcast"


def test_real_cpu_trace(tmp_path):
    def tiny_step(x):
        return jnp.sin(x @ x).sum()

    f = jax.jit(tiny_step)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()  # compile outside the trace
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    try:
        for _ in range(2):
            f(x).block_until_ready()
    finally:
        jax.profiler.stop_trace()
    t = op_times(find_trace(str(tmp_path)), module_contains="tiny_step")
    assert t.total_us > 0 and t.span_us > 0
    text = format_summary(t)
    assert "jit_tiny_step" in text.splitlines()[0]


@pytest.mark.integration
def test_cli_empty_dir_errors(tmp_path):
    r = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: no perfetto_trace.json.gz")
    assert str(tmp_path) in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_untagged_device_kernels_are_keyed_by_name(tmp_path):
    """Inside CUDA graphs kernels may carry no hlo_op; they still count, by kernel name,
    and the host's tagged events still do not."""
    path = tmp_path / "t.trace.json.gz"
    _write_trace(path, [_x(DEV, 0, 300, "sm90_xmma_gemm_bf16"), _x(DEV, 300, 100, "flash_fwd"),
                        _x(DEV, 400, 300, "sm90_xmma_gemm_bf16"),
                        _x(HOST, 0, 5000, "custom-call.1", "custom-call.1")])
    t = op_times(str(path))
    # 300 + 300 us of gemm, 100 us of flash: 700 us over a 0..700 us span.
    assert {k: (s.calls, s.us) for k, s in t.ops.items()} == {
        "sm90_xmma_gemm_bf16": (2, 600), "flash_fwd": (1, 100)}
    assert (t.total_us, t.span_us) == (700, 700)
