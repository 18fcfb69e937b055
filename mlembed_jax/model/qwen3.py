"""The Qwen3 embedding encoder: MEL token embedding, scanned decoder layers, MLL exits.

Parameter paths mirror Hugging Face Qwen3 names (embed_tokens, layers/self_attn/q_proj, ...),
with the layers stacked on a leading `layers` axis. Linear kernels are stored [in, out]
(HF stores [out, in]); attention projections keep heads as their own axis.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mlembed_jax.model.attention import layer_attention, with_named_residuals
from mlembed_jax.model.factorized_embed import FactorizedEmbed, PlainEmbed
from mlembed_jax.model.kernel_choice import remat_for
from mlembed_jax.recipe import model_exits, recipe_exits

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static model description; `from_config` reads it off the run config's `model` section."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    mel: bool = False
    mel_r_max: int = 512
    mel_r_min: int = 64
    exits: tuple[int, ...] = ()
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "dense"
    # Layers per iteration of the compiled layer loop (nn.scan's unroll). The program is the
    # same computation; perf/tpu_cost.py compiles 2 to count the loop body's cost per layer.
    scan_unroll: int = 1

    def __post_init__(self):
        if not self.exits:  # () means the recipe's exits for this depth
            object.__setattr__(self, "exits", recipe_exits(self.num_layers))

    @classmethod
    def from_config(cls, model_cfg) -> "EncoderConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: model_cfg[k] for k in fields if k in model_cfg}
        kw["exits"] = model_exits(model_cfg.exits, model_cfg.num_layers)
        # remat "auto" follows the kernel (kernel_choice.remat_for); both stay "auto" until
        # the run resolves the kernel for its devices (attention_choice.resolve_attention).
        kw["remat"] = remat_for(kw.get("remat", "none"), kw.get("attention", "dense"))
        return cls(**kw)

    def truncated(self, num_layers: int) -> "EncoderConfig":
        """The same model cut to its first `num_layers` layers (exits beyond it dropped)."""
        if not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"cannot run {num_layers} layers of a {self.num_layers}-layer model")
        exits = tuple(e for e in self.exits if e < num_layers) + (num_layers,)
        return dataclasses.replace(self, num_layers=num_layers, exits=exits)


# Policies that keep the attention kernel's residuals: the kernel must name them
# (attention.with_named_residuals) for the policy to see them.
_KEEPS_ATTENTION_RESIDUALS = ("attention", "dots_attention")


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "attn_out":
        return jax.checkpoint_policies.save_only_these_names("attn_out")
    if name == "attention":  # the kernel's residuals (attention.with_named_residuals)
        return jax.checkpoint_policies.save_only_these_names("attn_res", "attn_out")
    if name == "dots_attention":  # only elementwise work is recomputed
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names("attn_res", "attn_out"))
    if name != "full":
        raise ValueError(f"remat policy {name!r} must be resolved first (kernel_choice.remat_for)")
    return None  # "full": save nothing, recompute the whole layer


class RMSNorm(nn.Module):
    """x [..., dim] -> normalised in fp32, scaled, cast back to x's dtype (as HF Qwen3)."""

    dim: int
    eps: float
    axis_name: str = "norm"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis_name,)),
                           (self.dim,), self.param_dtype)
        return rms_norm(x, scale, self.eps)


def rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def rope(x, positions, theta):
    """Rotary embedding, HF's rotate-half layout. x [b, s, h, d], positions [b, s]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def matmul(x, w, contract: int = 1):
    """x [..., *k] @ w [*k, *out] -> [..., *out], k the last `contract` dims of x, computed
    as one 2-D [tokens, k] @ [k, out] matmul. The reshapes are free (contiguous dims), and
    with a single row dim the weight gradient is a plain x^T @ dy: with [b, s] as two free
    dims XLA:CPU transposed dy (and the silu gradient fused into it) for every matmul of
    every layer (README "Performance")."""
    lead, k = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    out = w.shape[contract:]
    kk = math.prod(k)
    y = x.reshape(-1, kk) @ w.reshape(kk, math.prod(out))
    return y.reshape(*lead, *out)


def _dense(module, name, shape, axes, dtype, param_dtype, fan_in):
    init = nn.initializers.normal(stddev=fan_in ** -0.5)
    kernel = module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)
    return kernel.astype(dtype)


def _linear(module, x, name, shape, axes, dtype, param_dtype, contract=1):
    """x @ W for the param `name` (see matmul), plus x @ A @ B when the `lora` collection
    adapts it (model/lora.py: B pre-scaled by alpha / r)."""
    fan_in = math.prod(shape[:contract])
    y = matmul(x, _dense(module, name, shape, axes, dtype, param_dtype, fan_in), contract)
    if module.has_variable("lora", name):
        ad = module.get_variable("lora", name)
        y = y + matmul(matmul(x, ad["A"].astype(dtype), contract), ad["B"].astype(dtype))
    return y


class Attention(nn.Module):
    """x [rows, seq, embed] -> [rows, seq, embed]. mask: the kernel's mask input, prepared
    once for all layers from the segment ids (attention.layer_attention)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, mask, positions):
        c, dt, pdt = self.cfg, _DTYPES[self.cfg.compute_dtype], _DTYPES[self.cfg.param_dtype]
        d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = _linear(self, x, "q_proj", (d, h, hd), ("embed", "heads", "head_dim"), dt, pdt)
        k = _linear(self, x, "k_proj", (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt, pdt)
        v = _linear(self, x, "v_proj", (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt, pdt)
        q = RMSNorm(hd, c.rms_norm_eps, "head_dim", pdt, name="q_norm")(q)
        k = RMSNorm(hd, c.rms_norm_eps, "head_dim", pdt, name="k_norm")(k)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        attend = layer_attention(c.attention)[1]
        if c.remat in _KEEPS_ATTENTION_RESIDUALS:
            attend = with_named_residuals(attend)
        out = attend(q, k, v, mask).astype(dt)
        out = checkpoint_name(out, "attn_out")
        return _linear(self, out, "o_proj", (h, hd, d), ("heads", "head_dim", "embed"), dt, pdt,
                       contract=2)


class MLP(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x):
        c, dt, pdt = self.cfg, _DTYPES[self.cfg.compute_dtype], _DTYPES[self.cfg.param_dtype]
        d, f = c.hidden_size, c.intermediate_size
        gate = _linear(self, x, "gate_proj", (d, f), ("embed", "mlp"), dt, pdt)
        up = _linear(self, x, "up_proj", (d, f), ("embed", "mlp"), dt, pdt)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _linear(self, hidden, "down_proj", (f, d), ("mlp", "embed"), dt, pdt)


class DecoderLayer(nn.Module):
    """One Qwen3 block. As a scan body: carry h [rows, seq, embed] -> (h, per-layer outputs).
    mask: the attention kernel's mask input (see Attention), the same for every layer."""

    cfg: EncoderConfig
    return_hidden: bool = False

    @nn.compact
    def __call__(self, h, mask, positions, pool_index):
        c, pdt = self.cfg, _DTYPES[self.cfg.param_dtype]
        x = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", pdt, name="input_layernorm")(h)
        h = h + Attention(c, name="self_attn")(x, mask, positions)
        x = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", pdt,
                    name="post_attention_layernorm")(h)
        h = h + MLP(c, name="mlp")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "activation_embed"))
        # Pool every layer's last tokens here ([texts, embed] is tiny), so all MLL exits come
        # out of the one pass; the final norm is applied to them after the loop.
        out = {"pooled": pool_last_tokens(h, pool_index)}
        if self.return_hidden:
            out["hidden"] = h
        return h, out


def pool_last_tokens(h: jax.Array, pool_index: jax.Array) -> jax.Array:
    """h [packs*rows, seq, embed], pool_index [packs, texts] (flat row*seq+col within a pack)
    -> [packs*texts, embed]. The gather stays inside each pack, so it never crosses shards."""
    packs, texts = pool_index.shape
    rows, seq, e = h.shape
    flat = h.reshape(packs, (rows // packs) * seq, e)
    pooled = jnp.take_along_axis(flat, pool_index[:, :, None], axis=1)
    return pooled.reshape(packs * texts, e)


class Qwen3Encoder(nn.Module):
    """Packed token rows -> pooled last-token embeddings at every MLL exit.

    Inputs: tokens, segment_ids, positions [rows, seq] int32 (see mlembed_jax/batch.py);
    pool_index [packs, texts] int32; rank: MEL rank (int32 scalar, traced; None = r_max).
    Returns {"pooled": [exits, packs*texts, embed] float32} and, with return_hidden, also
    "hidden": [layers, rows, seq, embed] (the pre-norm output of every layer; the last one
    with the final norm applied, as HF reports it).
    """

    cfg: EncoderConfig
    return_hidden: bool = False

    @nn.compact
    def __call__(self, tokens, segment_ids, positions, pool_index, rank=None):
        c = self.cfg
        dt, pdt = _DTYPES[c.compute_dtype], _DTYPES[c.param_dtype]
        if c.mel:
            embed = FactorizedEmbed(c.vocab_size, c.hidden_size, c.mel_r_max, pdt, dt,
                                    name="embed_tokens")
        else:
            embed = PlainEmbed(c.vocab_size, c.hidden_size, pdt, dt, name="embed_tokens")
        h = nn.with_logical_constraint(embed(tokens, rank), ("batch", "length", "activation_embed"))

        layer_cls = DecoderLayer
        if c.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_remat_policy(c.remat), prevent_cse=False)
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            unroll=c.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.return_hidden, name="layers")
        # The kernel's mask is built here, once, and enters the loop as a loop invariant, so
        # the backward pass keeps no per-layer copy of it (README "Performance").
        prepare = layer_attention(c.attention)[0]
        mask = prepare(segment_ids)
        if mask is not segment_ids:
            mask = nn.with_logical_constraint(mask, ("batch",) + (None,) * (mask.ndim - 1))
        h, per_layer = stack(h, mask, positions, pool_index)

        final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", pdt, name="norm")
        exit_idx = jnp.asarray([e - 1 for e in c.exits], jnp.int32)
        pooled = final_norm(per_layer["pooled"][exit_idx]).astype(jnp.float32)
        pooled = nn.with_logical_constraint(pooled, ("exits", "texts", "activation_embed"))
        out = {"pooled": pooled}
        if self.return_hidden:
            hidden = per_layer["hidden"]
            out["hidden"] = hidden.at[-1].set(final_norm(h))
        return out


def padded_inputs(tokens, lengths):
    """A plain right-padded batch as packed inputs: one text per row.

    tokens [batch, seq], lengths [batch] -> (segment_ids, positions, pool_index [batch, 1]).
    """
    tokens = jnp.asarray(tokens)
    seq = tokens.shape[1]
    col = jnp.arange(seq)[None, :]
    lengths = jnp.asarray(lengths)[:, None]
    segment_ids = (col < lengths).astype(jnp.int32)
    positions = jnp.broadcast_to(col, tokens.shape).astype(jnp.int32)
    return segment_ids, positions, (lengths - 1).astype(jnp.int32)


def param_count(params, exclude_embedding: bool = False) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(
        int(x.size) for path, x in leaves
        if not (exclude_embedding and "embed_tokens" in jax.tree_util.keystr(path))
    )
