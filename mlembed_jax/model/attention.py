"""Attention over packed rows: the one replaceable piece of the encoder.

Every implementation has the signature

    attn(q, k, v, segment_ids) -> out
    q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads, head_dim],
    segment_ids [batch, seq] int32 (0 = padding), out [batch, seq, heads, head_dim]

and must equal `dense_masked_attention`: a query attends to keys at or before its own column
that carry the same segment id. Texts are contiguous in a row, so column causality inside a
segment is causality by position inside the text. Faster kernels register here by name and
are tested against the dense reference, including that no text sees another.

A kernel may split into prepare(segment_ids) -> mask and attend(q, k, v, mask)
(`layer_attention`): the encoder prepares once per forward pass, outside its layer loop, and
every layer attends with the same mask, which is built once and never saved per layer for
the backward pass.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from jax.ad_checkpoint import checkpoint_name

from mlembed_jax.model.kernel_choice import (
    AUTO,
    DENSE_BLOCK,
    KERNELS,
    SPLASH_BLOCK,
    TOKAMAX_MISSING,
    pallas_interpret,
    splash_block,
)

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
MaskFn = Callable[[jax.Array], jax.Array]


def packed_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] segment ids -> [batch, 1, seq_q, seq_k] bool: same text and not in the future.

    Padding (segment 0) attends to padding only, which keeps its softmax finite; its outputs
    are never pooled.
    """
    seq = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.arange(seq)[:, None] >= jnp.arange(seq)[None, :]
    return (same & causal)[:, None]


def _attend(q, k, v, seg_q, seg_k, offset: int = 0):
    """Masked softmax attention of queries at columns offset.. of their rows over keys at
    columns 0..: q [b, sq, h, d], k, v [b, sk, kv, d], seg_q [b, sq], seg_k [b, sk] ->
    [b, sq, h, d]. Logits [b, h, sq, sk] in fp32."""
    b, sq, h, d = q.shape
    sk, kv = k.shape[1], k.shape[2]
    groups = h // kv
    # Grouped-query attention without copying k/v: a kv head's query group is one [g*sq]
    # row dim, so both matmuls are plain batched [rows, d] x [d, cols] products. With (g, q)
    # as two free dims XLA:CPU relaid the [sq, sk] logits out between the ops, twice a layer.
    # In fp32 the 1/sqrt(d) scale goes on q, inside the relayout that builds qg: on the
    # [sq, sk] logits XLA:CPU materialised the scalar as a logits-sized buffer, forward and
    # backward. A bf16 q would round once more, so there it stays on the fp32 logits.
    scale_q = q.dtype == jnp.float32
    qg = (q * jnp.float32(d ** -0.5) if scale_q else q).reshape(b, sq, kv, groups, d)
    qg = qg.transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * sq, d)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, sk, d]
    logits = jnp.einsum("bkmd,bksd->bkms", qg, kt, preferred_element_type=jnp.float32)
    # The mask as an additive bias, not a select: its gradient is the identity, so the
    # backward pass needs no mask pass over the scores (masked probabilities are exactly 0
    # either way; every query sees at least itself, so no row is all masked).
    same = seg_q[:, :, None] == seg_k[:, None, :]
    causal = jnp.arange(offset, offset + sq)[:, None] >= jnp.arange(sk)[None, :]
    bias = jnp.where(same & causal, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    logits = logits.reshape(b, kv, groups, sq, sk)
    logits = (logits if scale_q else logits * (d ** -0.5)) + bias
    # Softmax normalised after the value product: the division runs over [sq, d] outputs
    # instead of [sq, sk] probabilities. The max is a constant for the gradient (as in
    # jax.nn.softmax): the normalised result does not depend on it.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1).reshape(b, kv, groups * sq, 1)
    weights = weights.astype(v.dtype).reshape(b, kv, groups * sq, sk)
    out = jnp.einsum("bkms,bksd->bkmd", weights, vt, preferred_element_type=jnp.float32)
    out = (out / total).astype(v.dtype)  # [b, kv, g*sq, d]
    return out.reshape(b, kv, groups, sq, d).transpose(0, 3, 1, 2, 4).reshape(b, sq, h, d)


def dense_masked_attention(q, k, v, segment_ids):
    """Reference attention: materialises [batch, heads, seq, seq] logits in fp32."""
    return _attend(q, k, v, segment_ids, segment_ids)


def dense_blocks_attention(q, k, v, segment_ids, *, block: int = DENSE_BLOCK):
    """`dense` with the causal upper half skipped: query block i (`block` columns) scores
    only the keys of blocks 0..i, so about half of the [seq, seq] logits are never formed.
    Exact (the skipped logits are masked in `dense`); at seq <= block it is `dense`. The
    skip is static, so it holds for every row; keys of other texts inside the lower half
    are still masked, not skipped (which blocks those are differs per row)."""
    s = q.shape[1]
    if s <= block:
        return dense_masked_attention(q, k, v, segment_ids)
    outs = []
    for lo in range(0, s, block):
        hi = min(lo + block, s)
        outs.append(_attend(q[:, lo:hi], k[:, :hi], v[:, :hi], segment_ids[:, lo:hi],
                            segment_ids[:, :hi], lo))
    return jnp.concatenate(outs, axis=1)


def sdpa_attention(implementation: str | None):
    """jax.nn.dot_product_attention with the packed mask as a dense bool [b, 1, s, s].

    implementation "cudnn" is the fused GPU kernel; "xla" is the same call lowered by XLA,
    which runs everywhere and is what the CPU tests check the masking with.
    """

    def attn(q, k, v, segment_ids):
        mask = packed_causal_mask(segment_ids)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

    return attn


def splash_attention(q, k, v, segment_ids, *, block: int = SPLASH_BLOCK,
                     interpret: bool | None = None):
    """TPU splash attention (Pallas) with real segment ids and a causal mask.

    Per row and kv head, the kv head's query group runs as one multi-query kernel call. The
    kernel works on local data, so under a mesh it runs inside shard_map over the batch
    axes (heads stay whole). seq must be a multiple of 128; the block size is the largest
    multiple of 128 <= `block` that divides it (kernel_choice.splash_block).
    interpret: run in Pallas' interpreter (CPU tests); None = kernel_choice.INTERPRET_ENV.
    """
    # Imported on use: the TPU Pallas kernels load a large module only TPU runs need.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    blk = splash_block(s, block)
    if interpret is None:
        interpret = pallas_interpret()
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(g)])
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)

    def one_row(qr, kr, vr, seg):  # qr [s, h, d], kr/vr [s, kv, d], seg [s]
        ids = sk.SegmentIds(q=seg, kv=seg)
        qg = (qr * (d ** -0.5)).reshape(s, kv, g, d).transpose(1, 2, 0, 3)  # [kv, g, s, d]
        out = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(
            qg, kr.transpose(1, 0, 2), vr.transpose(1, 0, 2))  # [kv, g, s, d]
        return out.transpose(2, 0, 1, 3).reshape(s, h, d)

    return per_batch_shard(jax.vmap(one_row))(q, k, v, segment_ids)


def per_batch_shard(local: AttentionFn) -> AttentionFn:
    """Runs a kernel that only sees local arrays once per batch shard of the current mesh.

    Pallas and other custom-call kernels cannot be partitioned by XLA, which would otherwise
    gather the whole batch onto every device. The shards are those of the logical "batch"
    axis under the rules table in effect (sharding.activation_rules); with no rule for it
    the kernel sees the whole array. Heads stay whole inside the shard.
    """

    def attn(q, k, v, segment_ids):
        mesh = jax.sharding.get_abstract_mesh()
        # The mesh axes of the logical "batch" axis, from the rules table in effect.
        mapped = nn.logical_to_mesh_axes(("batch",))[0]
        mapped = mapped if isinstance(mapped, tuple) else (mapped,) if mapped else ()
        batch_axes = tuple(a for a in mapped if a in (mesh.axis_names or ()))
        if not batch_axes:
            return local(q, k, v, segment_ids)
        spec = jax.sharding.PartitionSpec(batch_axes)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec),
                             out_specs=spec, check_vma=False)(q, k, v, segment_ids)

    return attn


def _import_tokamax():
    try:
        import tokamax  # optional: only the tokamax kernels need it
    except ImportError as e:
        raise ImportError(f"{TOKAMAX_MISSING} ({e})") from e
    # tokamax reads its settings from absl flags and, if nobody has parsed flags yet (pytest,
    # a notebook, a library caller), parses sys.argv itself and fails on foreign options.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def same_text_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] segment ids -> [batch, 1, seq_q, seq_k] bool: query and key in the same
    text (padding with padding). Causality is left to the kernel."""
    segment_ids = jnp.asarray(segment_ids)
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def tokamax_masked(implementation: str) -> AttentionFn:
    """tokamax.dot_product_attention(q, k, v) with is_causal and a prepared same-text mask:
    attn(q, k, v, mask [b, 1, s, s] bool from `same_text_mask`) -> [b, s, h, d].

    "mosaic" is the Pallas Mosaic GPU flash kernel for Hopper and newer; "triton" is its
    Pallas Triton kernel; "xla" runs everywhere and is what CPU tests check the wiring with.
    A dense mask gives the kernels no block structure to skip, so masked-out blocks cost the
    same as real ones: one reason rows stay short (1024) rather than long.
    """

    def local(q, k, v, mask):
        tokamax = _import_tokamax()
        q, k, v, mask = (jnp.asarray(x) for x in (q, k, v, mask))  # tokamax type-checks arrays
        return tokamax.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                             implementation=implementation)

    return per_batch_shard(local)  # the mask shards on its batch axis like segment_ids


def prepared(prepare: MaskFn, attend: AttentionFn) -> AttentionFn:
    """The plain attn(q, k, v, segment_ids) of a kernel split into prepare and attend."""
    return lambda q, k, v, segment_ids: attend(q, k, v, prepare(segment_ids))


def with_named_residuals(fn: AttentionFn, name: str | None = "attn_res") -> AttentionFn:
    """`fn` whose backward residuals carry a checkpoint name, so a remat policy can keep them.

    For a flash kernel the residuals are q, k, v, the output and the softmax statistics
    ([batch, heads, seq] floats), and keeping them means the backward pass never reruns the
    kernel's forward, which a policy that only names the output would (custom-VJP residuals
    are otherwise recomputed). For `dense` they are the [s, s] probabilities: large.

    The mask input is never saved: a residual that holds it, or a bool copy of it of its
    shape (tokamax passes its inputs through a batching wrapper), is the input itself, which
    JAX forwards instead of saving. In the layer loop the mask is the same for every layer,
    so no per-layer [layers, b, 1, s, s] copy is kept. name None: that alone, names nothing.
    """

    def residual(r, mask):
        if r is mask or (r.dtype == jnp.bool_ and mask.dtype == jnp.bool_
                         and r.shape == mask.shape):
            return mask
        return r if name is None else checkpoint_name(r, name)

    @jax.custom_vjp
    def attn(q, k, v, mask):
        return fn(q, k, v, mask)

    def fwd(q, k, v, mask):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return out, jax.tree.map(lambda r: residual(r, mask), pullback)

    def bwd(pullback, g):
        return (*pullback(g), None)  # the mask is integers or bools: no cotangent

    attn.defvjp(fwd, bwd)
    return attn


# Kernels split into (prepare, attend); see `layer_attention`.
PREPARED: dict[str, tuple[MaskFn, AttentionFn]] = {
    f"tokamax_{impl}": (same_text_mask, with_named_residuals(tokamax_masked(impl), None))
    for impl in ("mosaic", "triton", "xla")
}

ATTENTION_IMPLS: dict[str, AttentionFn] = {
    "dense": dense_masked_attention,
    "dense_blocks": dense_blocks_attention,
    "xla_sdpa": sdpa_attention("xla"),
    "cudnn": sdpa_attention("cudnn"),
    "splash": splash_attention,
    **{name: prepared(*parts) for name, parts in PREPARED.items()},
}

assert set(ATTENTION_IMPLS) == set(KERNELS), "kernel_choice.KERNELS lists every kernel"


def get_attention(name: str) -> AttentionFn:
    if name == AUTO:
        raise ValueError("model.attention='auto' must be resolved to a kernel for the run's "
                         "devices first (attention_choice.resolve_attention)")
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; "
                         f"choose one of {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]


def layer_attention(name: str) -> tuple[MaskFn, AttentionFn]:
    """(prepare, attend) of kernel `name`: prepare(segment_ids [b, s]) runs once per forward
    pass, outside the layer loop; attend(q, k, v, prepare's result) runs in every layer and
    equals get_attention(name)(q, k, v, segment_ids). Kernels with nothing to precompute get
    the identity and take the segment ids themselves."""
    if name in PREPARED:
        return PREPARED[name]
    return (lambda segment_ids: segment_ids), get_attention(name)
