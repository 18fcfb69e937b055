"""The nested 3D-ML contrastive loss: MLL exits x MRL dims, hard negatives, in-batch, KD.

One pure function, `nested_contrastive_loss`, of the pooled embeddings of every text slot at
every MLL exit and the step's global sample slots (`batch.globalize_slots`). It is meant to be
called inside jit on global arrays: the in-batch logits span the whole global batch and XLA
inserts the cross-device gathers, so there is no host gather. Every shape is static; empty
slots are masked, never sliced away.

Per exit e and MRL dim m (embeddings cut to their first m dims, L2-normalised in fp32,
similarity = cosine / temperature):
  hard[e, m]     = mean over valid samples of CE([pos, valid negatives], target = pos)
  in_batch[e, m] = mean over valid in-batch samples of CE(positives of all valid samples in
                   the global batch, target = own positive)
  kd[e]          = MSE(queries) + MSE(positives) + MSE(negatives): each the mean squared
                   error over its own group of texts (and the compared dims) between the
                   student's pooled embedding at exit e and the teacher's at its paired exit
MRL weights: dims from largest to smallest get n = 1, 2, 3, ... and weight 1/(n sqrt(d/m)).
  total = (sum_e sum_m w_m (hard[e,m] + in_batch[e,m]) + kd_weight sum_e kd[e]) / num_exits
in_batch_gradient "queries" (default) stops the in-batch term's gradient into the positives,
as the reference does at every process count (its gather is not tracked by autograd); "full"
is the loss's own gradient, reaching them too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlembed_jax.recipe import MRL_MIN_DIM, mrl_weights

# Finite "minus infinity" for masked logits: exp(_MASKED - 20) is exactly 0 in fp32, so a
# masked column drops out of the softmax, yet a row with every column masked stays finite
# (a true -inf would give -inf - -inf = NaN there and in its gradient).
_MASKED = -1e9


def config_kwargs(loss_cfg: Any, packs: int | None = None) -> dict:
    """The keyword arguments of `nested_contrastive_loss` taken from the config's `loss`,
    plus `packs` (the step's pack count: pack-local text lookups) when given."""
    kw = dict(
        temperature=float(loss_cfg.temperature),
        mrl_min_dim=int(loss_cfg.mrl_min_dim),
        kd_weight=float(loss_cfg.kd_weight),
        in_batch_block_size=int(loss_cfg.in_batch_block_size),
        in_batch_gradient=str(loss_cfg.get("in_batch_gradient", "queries")),
    )
    if packs is not None:
        kw["packs"] = int(packs)
    return kw


def l2_normalize(x: jax.Array) -> jax.Array:
    """L2-normalise the last axis; a zero vector stays zero with a finite gradient."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def _masked_lse(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """logsumexp over the last axis of the `valid` entries (broadcast to logits)."""
    return jax.nn.logsumexp(jnp.where(valid, logits, _MASKED), axis=-1)


def map_row_blocks(fn, q: jax.Array, block_size: int = 0) -> jax.Array:
    """fn over blocks of the row axis of q [E, S, m]; fn: [E, b, m] -> [E, b]. Returns [E, S].

    block_size <= 0 (or >= S) is one call on all rows. Otherwise a sequential lax.map over
    blocks, so only one block's intermediates (e.g. [E, block_size, S] logits) are live. Block
    j holds rows j, j + nb, j + 2 nb, ... (strided, nb = number of blocks): when the row axis
    is sharded over devices, every block then has rows on every device, so the devices share
    each block's work instead of taking turns.
    """
    E, S, m = q.shape
    if block_size <= 0 or block_size >= S:
        return fn(q)
    nb = -(-S // block_size)
    pad = nb * block_size - S
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))  # padded rows are sliced off below
    blocks = qp.reshape(E, block_size, nb, m).transpose(2, 0, 1, 3)  # [nb, E, bs, m]
    out = jax.lax.map(fn, blocks)  # [nb, E, bs]
    return out.transpose(1, 2, 0).reshape(E, nb * block_size)[:, :S]


def in_batch_lse(
    q: jax.Array, p: jax.Array, col_valid: jax.Array, temperature, block_size: int = 0
) -> jax.Array:
    """Per-row logsumexp of the in-batch logits q @ p.T / temperature over valid columns.

    q: [E, S, m] normalised query rows; p: [E, S, m] normalised positives (the columns);
    col_valid: [S] bool. Returns [E, S] fp32. Rows go in blocks of block_size
    (`map_row_blocks`), each rematerialised in the backward pass.
    """

    def rows_lse(rows):  # [E, b, m] -> [E, b]
        logits = jnp.einsum("ebm,etm->ebt", rows, p) / temperature
        return _masked_lse(logits, col_valid[None, None, :])

    fn = rows_lse if block_size <= 0 or block_size >= q.shape[1] else jax.checkpoint(rows_lse)
    return map_row_blocks(fn, q, block_size)


def in_batch_top1(q: jax.Array, p: jax.Array, col_valid: jax.Array,
                  block_size: int = 0) -> jax.Array:
    """Per row, the index of the valid column with the highest q @ p.T. q, p [E, S, m],
    col_valid [S] bool -> [E, S] int32, in blocks of rows like `in_batch_lse`."""

    def rows_top1(rows):
        logits = jnp.einsum("ebm,etm->ebt", rows, p)
        return jnp.argmax(jnp.where(col_valid[None, None, :], logits, -jnp.inf), axis=-1)

    return map_row_blocks(rows_top1, q, block_size).astype(jnp.int32)


def pack_local_take(arr: jax.Array, idx: jax.Array, axis: int, packs: int | None) -> jax.Array:
    """arr [..., X, ...] at `axis`, looked up at text slots idx -> [..., *idx.shape, ...].

    With packs P (static), slots [p*T, (p+1)*T) (T = X // P) are pack p's texts and idx's
    leading axis is split into P equal parts, each pointing into its own pack only: P becomes
    a batch dim of the gather, so when packs are sharded each device looks up its own texts.
    None: one global gather (every device gets every looked-up text).
    """
    if packs is None:
        return jnp.take(arr, idx, axis=axis, mode="clip")
    X = arr.shape[axis]
    T = X // packs
    local = idx.reshape(packs, -1) - (jnp.arange(packs, dtype=idx.dtype) * T)[:, None]
    a = arr.reshape(arr.shape[:axis] + (packs, T) + arr.shape[axis + 1:])
    ind = local.reshape((1,) * axis + local.shape + (1,) * (arr.ndim - axis - 1))
    out = jnp.take_along_axis(a, ind, axis=axis + 1, mode="clip")  # [.., P, k, ..]
    return out.reshape(arr.shape[:axis] + idx.shape + arr.shape[axis + 1:])


def nested_contrastive_loss(
    pooled: jax.Array,
    slots: dict,
    *,
    temperature: float = 0.05,
    mrl_min_dim: int = MRL_MIN_DIM,
    teacher_pooled: jax.Array | None = None,
    kd_weight: float = 0.0,
    in_batch_block_size: int = 0,
    num_datasets: int | None = None,
    packs: int | None = None,
    in_batch_gradient: str = "queries",
) -> tuple[jax.Array, dict]:
    """The recipe's per-step loss.

    Args:
      pooled: [E, X, d] pooled embeddings of the X global text slots at each of the E MLL
        exits, any float dtype (cast to fp32 here).
      slots: `batch.globalize_slots` output. With S global sample slots and N negatives:
        query_text [S], positive_text [S] int (text slots), negative_text [S, N] int,
        negative_valid [S, N] bool, sample_valid [S] bool, in_batch [S] bool,
        dataset_id [S] int, text_valid [X] bool. A sample counts only if sample_valid and
        its query and positive texts are valid; a negative only if negative_valid and its text
        is valid. In-batch rows are the counted in_batch samples; the columns are the
        positives of all counted samples (in_batch or not).
      temperature: cosine similarities are divided by it.
      mrl_min_dim: smallest MRL dim (see `recipe.mrl_dims`); static.
      teacher_pooled: [E, X, d_t] pooled embeddings of a frozen teacher, exit by exit paired
        with the student's (train_step.teacher_config says which teacher layer pairs with
        which student exit), or None (no KD). Gradients never flow into it. If d_t >= d the
        teacher is cut to the student's width d (the recipe); if d_t < d the student is cut
        to d_t instead, since there is nothing to compare its extra dims with.
      kd_weight: weight of the KD term.
      in_batch_block_size: rows per block of the in-batch logits; <= 0 = no blocking. Static.
      num_datasets: if given (static), metrics also hold a per-dataset mean sample loss.
      packs: P, the packs of the step (static), or None. `batch.globalize_slots` puts the
        texts of pack p at slots [p*T, (p+1)*T) with T = X // P, and a sample only points at
        its own pack's texts. Given P, every text lookup is a gather inside its pack, so when
        the packs are sharded over devices each device looks up only its own samples' texts
        ([E, S/devices, ...]) and only the in-batch positives cross devices. None = one
        global gather, where every device ends up holding every sample's query, positive and
        negatives ([E, S, N, d] at global S: too much memory at large global batches).
        Same result either way.
      in_batch_gradient: "queries" or "full" (static): with "queries" the in-batch term
        treats the positives as constants (its gradient reaches the queries only: the
        reference); "full" differentiates it in full. The hard term's gradient reaches the
        positives either way.

    Returns:
      (total, metrics): total is an fp32 scalar. metrics (fp32 unless noted):
        total, hard, in_batch, kd: scalars, with total = hard + in_batch + kd_weight * kd,
          i.e. each part is already averaged over exits;
        hard_per_exit, in_batch_per_exit: [E], the MRL-weighted sum over dims at each exit;
        kd_per_exit: [E] the (unweighted) MSE(q) + MSE(p) + MSE(negatives) at each exit;
        num_samples, num_in_batch, num_negatives, num_texts: int32 counts of valid items;
        sample_loss: [S] each valid sample's own hard + in-batch loss, MRL-weighted and
          averaged over exits (0 for empty slots);
        with num_datasets: dataset_loss [D] (mean sample_loss of the dataset's valid samples,
          0 if none) and dataset_samples [D] int32.
    """
    E, X, d = pooled.shape
    f32 = jnp.float32
    text_valid = slots["text_valid"].astype(bool)
    # Zero invalid texts so garbage (even NaN) in empty slots can never leak into a value or
    # gradient through a masked product.
    x = jnp.where(text_valid[None, :, None], pooled.astype(f32), 0.0)

    if packs is not None and X % packs:
        raise ValueError(f"{X} text slots do not split into packs={packs} equal packs")
    if in_batch_gradient not in ("full", "queries"):
        raise ValueError(f"in_batch_gradient={in_batch_gradient!r} must be 'full' or 'queries'")

    def take(arr, idx, axis):
        return pack_local_take(arr, idx, axis, packs)

    qt, pt, nt = slots["query_text"], slots["positive_text"], slots["negative_text"]
    def tv(idx):
        return take(text_valid, idx, 0)

    sample_ok = slots["sample_valid"].astype(bool) & tv(qt) & tv(pt)  # [S]
    neg_ok = slots["negative_valid"].astype(bool) & tv(nt) & sample_ok[:, None]  # [S, N]
    row_ok = sample_ok & slots["in_batch"].astype(bool)  # [S] in-batch rows
    n_samples = jnp.sum(sample_ok)
    n_rows = jnp.sum(row_ok)
    sample_w = sample_ok.astype(f32) / jnp.maximum(n_samples, 1).astype(f32)
    row_w = row_ok.astype(f32) / jnp.maximum(n_rows, 1).astype(f32)

    q_all, p_all, n_all = take(x, qt, 1), take(x, pt, 1), take(x, nt, 1)  # [E,S(,N),d]
    hard_e = jnp.zeros((E,), f32)
    inb_e = jnp.zeros((E,), f32)
    sample_loss = jnp.zeros(sample_ok.shape, f32)
    for m, w in mrl_weights(d, mrl_min_dim):
        q = l2_normalize(q_all[..., :m])
        p = l2_normalize(p_all[..., :m])
        n = l2_normalize(n_all[..., :m])
        pos = jnp.sum(q * p, axis=-1) / temperature  # [E, S]
        neg = jnp.einsum("esm,esnm->esn", q, n) / temperature  # [E, S, N]
        hard_lse = jax.nn.logsumexp(
            jnp.concatenate([pos[..., None], jnp.where(neg_ok[None], neg, _MASKED)], -1), -1)
        hard_ce = jnp.where(sample_ok, hard_lse - pos, 0.0)  # [E, S]
        if in_batch_gradient == "queries":  # positives as constants in the in-batch term
            p_cols = jax.lax.stop_gradient(p)
            inb_pos = jnp.sum(q * p_cols, axis=-1) / temperature
        else:
            p_cols, inb_pos = p, pos
        inb_lse = in_batch_lse(q, p_cols, sample_ok, temperature, in_batch_block_size)
        inb_ce = jnp.where(row_ok, inb_lse - inb_pos, 0.0)  # [E, S]
        hard_e = hard_e + w * jnp.sum(hard_ce * sample_w, axis=-1)
        inb_e = inb_e + w * jnp.sum(inb_ce * row_w, axis=-1)
        sample_loss = sample_loss + w * jnp.mean(hard_ce + inb_ce, axis=0)

    if teacher_pooled is None:
        kd_e = jnp.zeros((E,), f32)
    else:
        t = jax.lax.stop_gradient(teacher_pooled).astype(f32)
        if t.ndim != 3 or t.shape[:2] != (E, X):
            raise ValueError(f"teacher_pooled has shape {t.shape}; want [{E}, {X}, d_t]: one "
                             "teacher exit per student exit")
        width = min(d, t.shape[-1])
        t = jnp.where(text_valid[None, :, None], t[..., :width], 0.0)
        sq = jnp.sum(jnp.square(x[..., :width] - t), axis=-1)  # [E, X], 0 if invalid
        # Each group's mean over its own texts and the compared dims, then summed.
        def group_mse(idx, ok):
            err = take(sq, idx, 1)  # [E, S(, N)]
            n = jnp.maximum(jnp.sum(ok), 1).astype(f32) * width
            return jnp.sum(jnp.where(ok[None], err, 0.0), axis=tuple(range(1, err.ndim))) / n

        kd_e = group_mse(qt, sample_ok) + group_mse(pt, sample_ok) + group_mse(nt, neg_ok)

    hard, inb, kd = jnp.mean(hard_e), jnp.mean(inb_e), jnp.mean(kd_e)
    total = hard + inb + kd_weight * kd
    metrics = {
        "total": total,
        "hard": hard,
        "in_batch": inb,
        "kd": kd,
        "hard_per_exit": hard_e,
        "in_batch_per_exit": inb_e,
        "kd_per_exit": kd_e,
        "num_samples": n_samples.astype(jnp.int32),
        "num_in_batch": n_rows.astype(jnp.int32),
        "num_negatives": jnp.sum(neg_ok).astype(jnp.int32),
        "num_texts": jnp.sum(text_valid).astype(jnp.int32),
        "sample_loss": sample_loss,
    }
    if num_datasets is not None:
        ds = jnp.where(sample_ok, slots["dataset_id"], num_datasets)  # empty -> dropped bin
        loss_sum = jax.ops.segment_sum(sample_loss, ds, num_segments=num_datasets + 1)
        count = jax.ops.segment_sum(sample_ok.astype(jnp.int32), ds,
                                    num_segments=num_datasets + 1)
        metrics["dataset_loss"] = (loss_sum / jnp.maximum(count, 1))[:num_datasets]
        metrics["dataset_samples"] = count[:num_datasets]
    return total, metrics
