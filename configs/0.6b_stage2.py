"""Qwen3-0.6B, the paper's stage 2: the full mix (every dataset), starting from stage 1's
trained weights (train.init_from=runs/0.6b-stage1, the workdir configs/0.6b_stage1.py's
README command writes): its params, MEL factors as trained, a fresh optimizer and data order.
The step is the reference's 64 samples on 1, 2, 4 or 8 devices (presets.py `reference_batch`).

  python -m mlembed_jax.train --config=configs/0.6b_stage2.py --workdir=runs/0.6b-stage2 \
      --config.data.prepared_dir=prepared/
"""

from mlembed_jax.presets import paper_stage, qwen3_config


def get_config():
    c = paper_stage(qwen3_config("0.6b"), 2, "0.6b")
    c.lock()
    return c
