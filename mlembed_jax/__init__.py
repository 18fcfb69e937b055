"""mlembed_jax: train multilingual text-embedding models with the 3D Matryoshka recipe.

Start at `train.py` (the loop) and `train_step.py` (the one step builder); README "Layout"
maps every module and follows one batch from parquet to export.
"""
