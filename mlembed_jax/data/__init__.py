"""Input side of training: prepare_data (tokenise), the packed Grain pipeline, global arrays.

Modules: manifest (dataset -> task type), prepare (parquet -> tokenised corpus), prepared
(loading it), schedule (pure data order), packing (texts -> fixed rows), pipeline (train and
validation iterators), global_batch (process-local -> global jax.Array), benchmark_mix
(synthetic batches of the ANCHORS length mix). No module here imports jax at import time.
"""

import os

DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "demo_data")
DEMO_MANIFEST = os.path.join(DEMO_DATA_DIR, "manifest.json")
DEMO_TOKENIZER = os.path.join(DEMO_DATA_DIR, "tokenizer")
DEMO_PREPARED = os.path.join(DEMO_DATA_DIR, "prepared")
