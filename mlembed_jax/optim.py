"""The recipe's optimiser: AdamW (0.9, 0.98), wd 0.01, clip 1.0, warmup + cosine/constant
(`lr_schedule`).

A separate learning rate for the MEL factors is possible (optim.mel_lr); every other
parameter group shares optim.lr.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(optim_cfg, total_steps: int, peak_lr: float | None = None) -> optax.Schedule:
    """lr at each step (0-based): linear warmup from 0 to `peak_lr` over optim.warmup_steps,
    then per optim.schedule:
      cosine: the reference's shape. Cosine decay from the peak to 0 at `total_steps`,
        clamped from below at min_lr at every step but step 0 (so the last stretch of the
        run sits at min_lr);
      cosine_to_min_lr: cosine decay from the peak to min_lr itself (optax's alpha);
      constant_with_warmup: the peak (warmup clamped at min_lr as for cosine).
    """
    peak = optim_cfg.lr if peak_lr is None else peak_lr
    warmup = max(int(optim_cfg.warmup_steps), 0)
    floor = min(optim_cfg.min_lr, peak)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.schedule == "cosine_to_min_lr":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0)
        return after if warmup == 0 else optax.join_schedules([warm, after], [warmup])
    if optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.0)
    else:
        after = optax.constant_schedule(peak)
    sched = after if warmup == 0 else optax.join_schedules([warm, after], [warmup])
    # The reference raises the lr to min_lr after every optimizer step, so every step but
    # the first (lr 0 in warmup) runs at min_lr or more, warmup included.
    return lambda count: jnp.where(count == 0, sched(count), jnp.maximum(sched(count), floor))


def _adamw(optim_cfg, schedule):
    return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8,
                       weight_decay=optim_cfg.weight_decay)


def param_groups(params) -> dict:
    """'mel' for the MEL factors, 'default' for everything else (a pytree of labels)."""
    def label(path, _):
        keys = [getattr(p, "key", None) for p in path]
        return "mel" if keys[:1] == ["embed_tokens"] and keys[-1] in ("U", "V") else "default"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim_cfg, total_steps: int):
    """Returns (optax transformation, schedule of the default group for logging)."""
    schedule = lr_schedule(optim_cfg, total_steps)
    tx = _adamw(optim_cfg, schedule)
    if optim_cfg.mel_lr >= 0 and optim_cfg.mel_lr != optim_cfg.lr:
        mel_tx = _adamw(optim_cfg, lr_schedule(optim_cfg, total_steps, optim_cfg.mel_lr))
        tx = optax.multi_transform({"default": tx, "mel": mel_tx}, param_groups)
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), tx), schedule
