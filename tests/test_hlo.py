"""perf/hlo.py on HLO text shaped like XLA:TPU's: Pallas kernel metadata with raw newlines
inside a loop body, and the megascale sends of a multi-slice program (the cross-slice
collectives). The snippets copy the syntax of libtpu 0.0.42's compiled splash and
two-slice programs (tests/test_aot.py checks the same on real compiles where libtpu is
installed)."""

from mlembed_jax.perf import hlo


def _megascale(kind: str, target: str, reduce: str | None = None) -> str:
    """A megascale send's frontend attributes, as XLA:TPU prints them."""
    return ('is_host_transfer=true, frontend_attributes={'
            '_xla_host_transfer_handler_name="xla_megascale_runtime",'
            '_xla_host_transfer_rendezvous="all-reduce.189_0",'
            + (f'_xla_megascale_reduce_operation="{reduce}",' if reduce else '')
            + f'_xla_megascale_target="{target}",_xla_megascale_transfer_type="{kind}"}}')


# A while body holding a splash kernel whose frontend attributes span three lines, the second
# starting with "}}": a line that starts with "}" but does not end the computation. The
# all-gather after it is still in the body, so it runs once per layer.
MODULE = "\n".join([
    "HloModule jit_step, num_partitions=4",
    "",
    "%add (a: f32[], b: f32[]) -> f32[] {",
    "  %a = f32[] parameter(0)",
    "  %b = f32[] parameter(1)",
    "  ROOT %sum = f32[] add(%a, %b)",
    "}",
    "",
    "%body.1 (p: (s32[], bf16[1,64,128])) -> (s32[], bf16[1,64,128]) {",
    "  %p = (s32[], bf16[1,64,128]) parameter(0)",
    "  %x = bf16[1,64,128]{2,1,0} get-tuple-element(%p), index=1",
    "  %splash.1 = (f32[8,2,128,16]{3,2,1,0:T(8,128)}) custom-call(%x), "
    'custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={',
    '"xprof_metadata":"{\\"block_q\\": 128, \\"block_kv\\": 128}"',
    '}}, metadata={op_name="jit(step)/while/body/splash_mqa_fwd_segmented_residuals"}',
    "  %all-gather.7 = bf16[1,64,256]{2,1,0} all-gather(%x), channel_id=3, "
    "replica_groups={{0,1},{2,3}}, dimensions={2}",
    "  %send.2 = (bf16[768,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) send(%x, %aa.2), "
    "channel_id=6, " + _megascale("ALL_REDUCE", "{{100000,300000},{100001,300001},"
                                                "{200000,400000}}", "SUM"),
    "  ROOT %t = (s32[], bf16[1,64,128]) tuple(%i, %x)",
    "}",
    "",
    "%cond.1 (p: (s32[], bf16[1,64,128])) -> pred[] {",
    "  %p = (s32[], bf16[1,64,128]) parameter(0)",
    "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
    "}",
    "",
    "ENTRY %main.9 (a: bf16[1,64,128]) -> f32[1024] {",
    "  %a = bf16[1,64,128]{2,1,0} parameter(0)",
    "  %while.1 = (s32[], bf16[1,64,128]) while(%init), condition=%cond.1, body=%body.1",
    "  %all-reduce.3 = f32[1024]{0} all-reduce(%g), channel_id=9, "
    "replica_groups=[1,4]<=[4], to_apply=%add",
    "  %send.1 = (f32[7,20,512]{2,1,0:T(8,128)}, u32[], token[]) send(%e, %aa.1), "
    "channel_id=4, " + _megascale("ALL_GATHER", "{1,2}x{0:3}"),
    "  ROOT %r = f32[1024]{0} copy(%all-reduce.3)",
    "}",
    "",
])


def test_kernel_metadata_lines_do_not_end_a_computation():
    comps = hlo.computations(MODULE)
    assert set(comps) == {"add", "body.1", "cond.1", "main.9"}
    assert any("all-gather(" in line for line in comps["body.1"])
    assert hlo.loop_computations(comps) == {"body.1"}
    cols = {(c.kind, c.in_loop, c.bytes) for c in hlo.collectives(MODULE)}
    # bf16[1,64,256] = 32768 B inside the layer loop; f32[1024] = 4096 B once per step.
    assert cols == {("all-gather", True, 32768), ("all-reduce", False, 4096)}


def test_megascale_sends_are_the_cross_slice_collectives():
    sends = sorted(hlo.dcn_transfers(MODULE), key=lambda t: t.kind)
    assert [(t.kind, t.reduce, t.in_loop) for t in sends] == [
        ("ALL_GATHER", None, False), ("ALL_REDUCE", "SUM", True)]
    gather, reduce = sends
    assert gather.result == "f32[7,20,512]" and gather.bytes == 7 * 20 * 512 * 4
    assert gather.slices == [[0, 1]]  # "{1,2}x{0:3}": 1-based slice ids
    assert reduce.bytes == 768 * 8 * 128 * 2
    # Global device ids (slice + 1) * 100000 + chip: slices 0 and 2, and 1 and 3.
    assert reduce.slices == [[0, 2], [1, 3]]
    # A single-slice program has no megascale sends.
    assert hlo.dcn_transfers(MODULE.replace("xla_megascale_runtime", "other")) == []


# Shaped like XLA:GPU's 0.6B step: a layer loop with a known trip count holding a transpose
# fusion, a nested loop inside it, a plain copy in the entry and fusions of other kinds.
COPY_MODULE = "\n".join([
    "HloModule jit_step",
    "",
    "%fused_transpose (p0: s8[2,4,8]) -> s8[2,8,4] {",
    "  %p0 = s8[2,4,8]{2,1,0} parameter(0)",
    "  ROOT %transpose.1 = s8[2,8,4]{2,1,0} transpose(%p0), dimensions={0,2,1}",
    "}",
    "",
    "%inner (q: f32[16]) -> f32[16] {",
    "  %q = f32[16]{0} parameter(0)",
    "  ROOT %copy.9 = f32[16]{0} copy(%q)",
    "}",
    "",
    "%body (p: s8[2,4,8]) -> s8[2,4,8] {",
    "  %p = s8[2,4,8]{2,1,0} parameter(0)",
    "  %input_convert_transpose_fusion = s8[2,8,4]{2,1,0} fusion(%p), kind=kInput, "
    "calls=%fused_transpose",
    "  %w2 = f32[16]{0} while(%z), condition=%cond, body=%inner, "
    'backend_config={"known_trip_count":{"n":"5"}}',
    "  ROOT %loop_add_fusion = s8[2,4,8]{2,1,0} fusion(%p), kind=kLoop, calls=%fused_add",
    "}",
    "",
    "ENTRY %main (a: s8[2,4,8]) -> s8[2,4,8] {",
    "  %a = s8[2,4,8]{2,1,0} parameter(0)",
    "  %copy.1 = s8[2,4,8]{2,1,0} copy(%a)",
    "  ROOT %w = s8[2,4,8]{2,1,0} while(%copy.1), condition=%cond, body=%body, "
    'backend_config={"known_trip_count":{"n":"28"}}',
    "}",
])


def test_copy_ops_count_loop_bodies_times_their_trip_count():
    c = hlo.copy_ops(COPY_MODULE)
    # By hand: the entry's copy once (64 B); the transpose fusion 28 times (64 B each); the
    # inner loop's copy 28 x 5 times (64 B each); the add fusion and the fused transpose
    # inside the fusion's own computation are not counted.
    assert (c.ops, c.in_loop, c.per_step, c.unknown_trips) == (3, 2, 1 + 28 + 140, 0)
    assert c.bytes_per_step == 64 + 28 * 64 + 140 * 64
