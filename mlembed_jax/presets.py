"""Run presets the size configs build on: the recipe's base config with one published Qwen3
shape and that size's default layout filled in (configs/0.6b.py ... configs/8b.py), and the
runs the paper and its release imply on top of a size: the released run (`released_run`)
and the paper's two training stages (`paper_stage`).

Shapes (hidden, intermediate, layers, q heads, kv heads) and tie flags are the published
Qwen3 ones; vocab 151,936, head_dim 128, RoPE theta 1e6.
"""

from __future__ import annotations

from mlembed_jax.config import base_config

# Default layout per size, for the hardware each size is meant for (tools/aot_compile.py
# checks them; README table). "fsdp": every device holds 1/n of the params and optimizer
# moments (mesh.fsdp=-1, data=1) and the batch is split over all devices too; it needs no
# change between 8 GPUs and a 64-chip pod. "data": plain data parallelism, each device a
# full replica (small models: no gathers of weights at all).
# in_batch_block_size: rows per block of the in-batch logits (loss.py). A block holds every
# device's rows, so no device holds more than [exits, block/devices, global samples] logits;
# with <= block sample slots (e.g. 8 per device x 64 devices) it is one plain block.
# remat: "auto" keeps a flash kernel's residuals (model.remat); 4B on its v6e-64 cannot
# afford them (tools/aot_compile.py; README "Memory and FLOPs per configuration"), so it
# recomputes the layer ("full").
QWEN3_LAYOUT = {
    #        layout, in_batch_block_size, remat
    "0.6b": ("data", 4096, "auto"),
    "1.7b": ("fsdp", 4096, "auto"),
    "4b": ("fsdp", 4096, "full"),
    "8b": ("fsdp", 4096, "auto"),
}

QWEN3_SHAPES = {
    #        hidden, intermediate, layers, heads, kv_heads, tied
    "0.6b": (1024, 3072, 28, 16, 8, True),
    "1.7b": (2048, 6144, 28, 16, 8, True),
    "4b": (2560, 9728, 36, 32, 8, True),
    "8b": (4096, 12288, 36, 32, 8, False),
}


def qwen3_config(size: str):
    """base_config() with the Qwen3 `size` ("0.6b", "1.7b", "4b", "8b") shape and layout."""
    hidden, inter, layers, heads, kv, tied = QWEN3_SHAPES[size]
    c = base_config()
    m = c.model
    m.hidden_size, m.intermediate_size, m.num_layers = hidden, inter, layers
    m.num_heads, m.num_kv_heads, m.tie_word_embeddings = heads, kv, tied
    # The fastest kernel this platform has that passes its start-up check (splash on TPU,
    # tokamax Mosaic or cuDNN on NVIDIA GPUs, dense on CPU); remat per QWEN3_LAYOUT.
    m.attention = "auto"
    layout, block, m.remat = QWEN3_LAYOUT[size]
    if layout == "fsdp":
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    else:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.loss.in_batch_block_size = block
    # The recipe's per-device batch: one pack of 8 samples per device (data.packs_per_step
    # -1), packed into rows of 1024 tokens (base_config's data.* fields).
    return c


# The reference's step: 8 samples per GPU x 8 GPUs.
REFERENCE_GLOBAL_BATCH = 64


def reference_batch(c):
    """Pins the step at the reference's 64 samples on any device count that divides its
    packs: data.packs_per_step = 64 / data.samples_per_pack (8 packs of 8), instead of one
    pack per device. On fewer than 8 devices a device runs several packs, one at a time
    through cached gradients (train.grad_cache_chunks=-1), so its memory stays one pack's.
    Returns `c`."""
    c.data.packs_per_step = REFERENCE_GLOBAL_BATCH // c.data.samples_per_pack
    c.train.grad_cache_chunks = -1
    return c


def released_run(c):
    """The released run's settings: MEL at a fixed rank, r_max (512), without rank sampling
    (model.mel_r_min = mel_r_max: the rank set is {r_max}), at the reference's 64-sample
    step (`reference_batch`). Returns `c`."""
    c.model.mel_r_min = c.model.mel_r_max
    return reference_batch(c)


def stage1_workdir(size: str) -> str:
    """Where the README's stage-1 command writes, which stage 2 continues from."""
    return f"runs/{size}-stage1"


def paper_stage(c, stage: int, size: str):
    """The paper's two stages. 1: the retrieval datasets only (data.task_types), from the
    HF backbone given as train.init_from. 2: the full mix, from stage 1's trained weights
    (train.init_from = stage 1's workdir: its params, MEL factors as trained, with a fresh
    optimizer and data order). Both at the reference's 64-sample step (`reference_batch`).
    Returns `c`."""
    reference_batch(c)
    if stage == 1:
        c.data.task_types = ("retrieval",)
    elif stage == 2:
        c.data.task_types = ()
        c.train.init_from = stage1_workdir(size)
    else:
        raise ValueError(f"stage={stage!r}: the paper trains in stages 1 and 2")
    return c

