"""Qwen3-0.6B trained as the released ML-Embed run: 3D-ML with MEL at a fixed rank 512
(no rank sampling; mlembed_jax/presets.py `released_run`), MLL exits and MRL dims, at the
reference's step of 64 samples (8 packs of 8) on 1, 2, 4 or 8 devices (`reference_batch`).

  python -m mlembed_jax.train --config=configs/0.6b_released.py --workdir=runs/0.6b-released \
      --config.train.init_from=/path/to/Qwen3-0.6B --config.data.prepared_dir=prepared/
"""

from mlembed_jax.presets import qwen3_config, released_run


def get_config():
    c = released_run(qwen3_config("0.6b"))
    c.lock()
    return c
