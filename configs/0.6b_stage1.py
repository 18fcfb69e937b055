"""Qwen3-0.6B, the paper's stage 1: the full 3D-ML recipe on the retrieval datasets only
(data.task_types=("retrieval",); the other datasets of the prepared data are left out), at
the reference's step of 64 samples on 1, 2, 4 or 8 devices (presets.py `reference_batch`).

  python -m mlembed_jax.train --config=configs/0.6b_stage1.py --workdir=runs/0.6b-stage1 \
      --config.train.init_from=/path/to/Qwen3-0.6B --config.data.prepared_dir=prepared/

Stage 2 (configs/0.6b_stage2.py) continues from this workdir's weights.
"""

from mlembed_jax.presets import paper_stage, qwen3_config


def get_config():
    c = paper_stage(qwen3_config("0.6b"), 1, "0.6b")
    c.lock()
    return c
