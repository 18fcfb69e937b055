"""The learning-rate schedule against the reference's: transformers' cosine with warmup (which
decays to 0), clamped from below at min_lr after every step (`utils.py`: optimizer.step(),
lr_scheduler.step(), then `if lr < args.min_lr: lr = args.min_lr`), so only step 0 is not."""

import math

import numpy as np
import pytest
import torch
import transformers

from mlembed_jax.config import base_config
from mlembed_jax.optim import lr_schedule


def _optim(**fields):
    o = base_config().optim
    o.update(fields)
    return o


def reference_lrs(lr, min_lr, warmup, total):
    """lr of steps 0..total-1 as the reference's loop sets them: a torch optimizer driven by
    transformers.get_cosine_schedule_with_warmup (cosine to 0); after each step the
    scheduler steps, then an lr below min_lr is raised to it (the next scheduler step
    recomputes the lr from the schedule, so the clamp does not accumulate)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if opt.param_groups[0]["lr"] < min_lr:
            opt.param_groups[0]["lr"] = min_lr
    return np.asarray(out)


# min_lr 1e-6 with warmup 100: warmup steps 1..9 (lr 1e-7..9e-7) are raised to min_lr too.
@pytest.mark.parametrize("warmup,total,min_lr", [(100, 1000, 1e-7), (0, 50, 1e-7),
                                                 (10, 11, 1e-7), (100, 300, 1e-6)])
def test_cosine_is_the_reference_shape(warmup, total, min_lr):
    o = _optim(lr=1e-5, min_lr=min_lr, warmup_steps=warmup)
    got = np.asarray([float(lr_schedule(o, total)(s)) for s in range(total)])
    want = reference_lrs(1e-5, min_lr, warmup, total)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-13)
    if total == 1000:
        # lr / 2 * (1 + cos(pi p)) falls below min_lr once cos(pi p) < -0.98, i.e. for
        # p > 1 - acos(0.98) / pi = 0.9362: decay steps 843..899 of 900 (steps 943..999) sit
        # at min_lr, the last 5.7% of the run.
        first = 100 + math.ceil(900 * (1 - math.acos(0.98) / math.pi))
        assert first == 943
        assert (got[first:] == np.float32(1e-7)).all() and got[first - 1] > 1e-7


def test_cosine_to_min_lr_is_the_option():
    o = _optim(lr=1e-5, min_lr=1e-7, warmup_steps=100, schedule="cosine_to_min_lr")
    s = lr_schedule(o, 1000)
    # Halfway through the decay: the midpoint of peak and min_lr (optax alpha), where the
    # reference shape gives half the peak.
    np.testing.assert_allclose(float(s(550)), (1e-5 + 1e-7) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(lr_schedule(_optim(warmup_steps=100), 1000)(550)), 5e-6,
                               rtol=1e-6)
    # Where the reference reaches its floor (step 943, above), decaying to min_lr instead
    # gives min_lr + (1 - min_lr / lr) * c, c = lr / 2 * (1 + cos(pi 843 / 900)) just under
    # min_lr: nearly twice the reference's lr.
    ref = reference_lrs(1e-5, 1e-7, 100, 1000)
    c = 1e-5 / 2 * (1 + math.cos(math.pi * 843 / 900))
    np.testing.assert_allclose(float(s(943)), 1e-7 + 0.99 * c, rtol=1e-5)
    assert 1.95 < float(s(943)) / ref[943] < 2
