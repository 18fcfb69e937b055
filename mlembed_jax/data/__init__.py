"""Input side: prepare_data (tokenise), the packed Grain pipeline, and the shipped demo data.

Modules: manifest (dataset -> task type), parquet_io (reading and checking parquet tables;
DataError), prepare (parquet -> tokenised corpus), prepared (loading it; how a run's texts
were tokenised), schedule (pure data order), packing (the one
first-fit packer: texts -> fixed rows, for training and for encode), pipeline (train and
validation iterators), text_encoding (text -> token ids). No module here imports jax; the
step's global arrays are built by sharding.to_global_batch.
"""

import os

DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "demo_data")
DEMO_MANIFEST = os.path.join(DEMO_DATA_DIR, "manifest.json")
DEMO_TOKENIZER = os.path.join(DEMO_DATA_DIR, "tokenizer")
DEMO_PREPARED = os.path.join(DEMO_DATA_DIR, "prepared")
