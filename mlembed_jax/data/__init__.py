"""Input side: prepare_data (tokenise), the packed Grain pipeline, and the shipped demo data.

No module here imports jax; the step's global arrays are built by sharding.to_global_batch.

Modules:
  manifest       the dataset manifest: task type, instruction prefixes, negatives
  parquet_io     reading and checking parquet tables; DataError names file, row, column
  prepare        parquet -> the tokenised, deduplicated prepared data (prepare_data)
  prepared       loading prepared data; how a run's texts were tokenised
  text_encoding  text -> token ids (truncate, then EOS); the tokenizer; prompt choice
  schedule       the pure data order, a function of (seed, epoch, indices)
  plan           the run's plan: each step's samples, their packs and row bucket
  packing        the one first-fit packer: texts -> fixed rows, training and encode
  pipeline       the train and validation iterators (Grain)
  jsonl          JSON Lines with errors that name the file and the line
"""

import os

DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "demo_data")
DEMO_MANIFEST = os.path.join(DEMO_DATA_DIR, "manifest.json")
DEMO_TOKENIZER = os.path.join(DEMO_DATA_DIR, "tokenizer")
DEMO_PREPARED = os.path.join(DEMO_DATA_DIR, "prepared")
