"""mlembed_jax: train multilingual text-embedding models with the 3D Matryoshka recipe.

Start at `train.py` (the loop) and `train_step.py` (the one step builder); README "Layout"
maps every module and follows one batch from parquet to export.

Modules:
  recipe             the recipe's point sets (exits, ranks, MRL dims) and the point check
  config             the run config: every field, its default, its validation
  presets            the published Qwen3 shapes and each size's default layout
  sharding           the mesh, the logical-axis rules table, the batch's layout on it
  batch              the packed batch contract between the data pipeline and the step
  loss               the nested 3D-ML contrastive loss (exits x dims, hard, in-batch, KD)
  optim              AdamW and its learning-rate schedule
  grad_cache         cached embedding gradients: a big batch at one chunk's memory
  attention_choice   model.attention resolved for the devices at hand (auto's choice, checked)
  train_step         the train state, the pure step functions, the one step builder
  train              `python -m mlembed_jax.train`: the training loop
  train_report       what the loop logs: each interval's metrics, epoch lines
  lora_run           a LoRA run's frozen base: loaded once, placed, fingerprinted
  divergence         the parameter-norm divergence rule (train.divergence_factor)
  preemption         SIGTERM: save at the next step boundary, on every process at once
  run_summary        what a run prints at its start and end
  cli                command-line pieces shared by training and the tools
  distributed        starting JAX's distributed runtime on a pod or cluster
  metrics_log        metrics.jsonl and TensorBoard
  storage            local or gs:// paths; every durable write (temp, fsync, rename)
  embedding          pooled embeddings of token ids at any exits, packed and jitted
  embedding_store    embeddings written once, keyed by content, reused
  encode             the Encoder API, encode.load and the encode command line
  mining             hard-negative mining with false-negative filters
  data/              prepare, load and pack the training data (see data/__init__.py)
  model/             the Qwen3 encoder with MEL and MLL (see model/__init__.py)
  checkpoint/        Orbax checkpoints: reader (what tools import), manager, resume, verify
  eval/              retrieval evaluation and the loop's evaluators (see eval/__init__.py)
  export/            Hugging Face / sentence-transformers export (see export/__init__.py)
  perf/              FLOPs, AOT compiles, benchmarks, profiles (see perf/__init__.py)
"""
