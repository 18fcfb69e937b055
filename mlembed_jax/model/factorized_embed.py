"""MEL: the factorized token embedding, U [vocab, r_max] @ V [r_max, embed], at a sampled rank.

The lookup gathers rows of U and masks columns >= r before multiplying by V, so the
[vocab, embed] matrix is never built and every rank has the same shapes (no recompiles).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlembed_jax.recipe import mel_rank_set


def sample_mel_rank(key: jax.Array, r_min: int, r_max: int) -> jax.Array:
    """One rank from the rank set with probability proportional to r. Returns an int32 scalar."""
    ranks = jnp.asarray(mel_rank_set(r_min, r_max), jnp.int32)
    logits = jnp.log(ranks.astype(jnp.float32))
    return ranks[jax.random.categorical(key, logits)]


def svd_factors(embedding: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Pretrained W [vocab, embed] -> (U [vocab, r_max], V [r_max, embed]), U = U_svd S, V = Vh.

    Uses the eigendecomposition of the small Gram matrix W^T W [embed, embed] in float64
    (same factors as a thin SVD, but one matmul over the vocab instead of an SVD of a
    151,936-row matrix). U[:, :r] @ V[:r] is then the best rank-r approximation of W, and at
    full rank it reproduces W to rounding.
    """
    w = np.asarray(embedding, np.float64)
    if r_max > min(w.shape):
        raise ValueError(f"MEL rank r_max={r_max} exceeds min(vocab, embed)={min(w.shape)}")
    eigvals, eigvecs = np.linalg.eigh(w.T @ w)  # ascending
    order = np.argsort(eigvals)[::-1][:r_max]
    v = eigvecs[:, order]  # [embed, r_max], orthonormal columns
    # Fix each component's sign so the factors are deterministic across BLAS builds.
    u_s = w @ v
    signs = np.sign(u_s[np.argmax(np.abs(u_s), axis=0), np.arange(r_max)])
    signs[signs == 0] = 1.0
    return (u_s * signs).astype(np.float32), (v * signs).T.astype(np.float32)


class FactorizedEmbed(nn.Module):
    """Token ids [...] -> embeddings [..., embed] through rank-r MEL factors."""

    vocab_size: int
    embed_dim: int
    r_max: int
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, rank: jax.Array | int | None = None) -> jax.Array:
        # From scratch, U ~ N(0, 0.02) and V ~ N(0, 1/r_max) give full-rank embeddings of
        # std 0.02, like a plain table; two factors of 0.02 would start 50x too small.
        # (From a checkpoint both come from the SVD instead.)
        init = nn.initializers.normal(stddev=0.02)
        v_init = nn.initializers.normal(stddev=self.r_max ** -0.5)
        u = self.param("U", nn.with_logical_partitioning(init, ("vocab", "rank")),
                       (self.vocab_size, self.r_max), self.param_dtype)
        v = self.param("V", nn.with_logical_partitioning(v_init, ("rank", "embed")),
                       (self.r_max, self.embed_dim), self.param_dtype)
        rows = jnp.take(u, tokens, axis=0).astype(self.dtype)  # [..., r_max]
        if rank is not None:
            keep = jnp.arange(self.r_max) < rank
            rows = jnp.where(keep, rows, jnp.zeros((), self.dtype))
        return jnp.dot(rows, v.astype(self.dtype))


class PlainEmbed(nn.Module):
    """Token ids [...] -> embeddings [..., embed] from a plain table (MEL off)."""

    vocab_size: int
    embed_dim: int
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, rank=None) -> jax.Array:
        del rank  # a plain table has no rank
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
            (self.vocab_size, self.embed_dim), self.param_dtype)
        return jnp.take(table, tokens, axis=0).astype(self.dtype)
