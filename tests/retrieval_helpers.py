"""The small model trained on the demo's cldr_names that the retrieval, encode, mining and
report tests share, and BEIR-format test sets written by hand."""

import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "mlembed_jax", "demo_data")

# The shared trained model: the demo's retrieval dataset (cldr_names) alone, prepared with the
# demo tokenizer, and the small test model trained with 32 samples per step, so a few hundred
# steps learn it (measured figures: test_retrieval_eval's margin test).
TRAIN_STEPS = 500
TRAIN_OVERRIDES = {
    "mesh.num_devices": 1, "data.samples_per_pack": 32,
    "data.validation_fraction": 0.2,  # 543 held-out queries: a metric that is not noise
    "train.max_steps": TRAIN_STEPS, "train.checkpoint_every": 1000,
}


def trained_names_run(root) -> tuple[str, object]:
    """(workdir, config) of the shared run under `root`; trained once per pytest session
    (the conftest fixture `names_run`; the done marker lets direct callers reuse it)."""
    from train_helpers import small_config

    from mlembed_jax.data.prepare import prepare_data
    from mlembed_jax.train import run

    base = os.path.join(str(root), "names_run")
    data, work = os.path.join(base, "data"), os.path.join(base, "work")
    config = small_config(**TRAIN_OVERRIDES, **{
        "data.prepared_dir": os.path.join(data, "prepared"),
        "data.manifest": os.path.join(data, "manifest.json")})
    if not os.path.exists(os.path.join(base, "done")):
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(os.path.join(data, "raw"))
        shutil.copy(os.path.join(DEMO_DATA, "raw", "cldr_names.parquet"),
                    os.path.join(data, "raw"))
        with open(config.data.manifest, "w") as f:
            json.dump({"cldr_names": {"task_type": "retrieval"}}, f)
        prepare_data(os.path.join(data, "raw"), config.data.manifest,
                     os.path.join(DEMO_DATA, "tokenizer"), config.data.prepared_dir,
                     max_seq_length=64, workers=1, verbose=False)
        assert run(config, work) == 0
        open(os.path.join(base, "done"), "w").close()
    return work, config


def write_beir(path, corpus, queries, qrels, header=True):
    os.makedirs(os.path.join(path, "qrels"), exist_ok=True)
    with open(os.path.join(path, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in corpus)
    with open(os.path.join(path, "queries.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in queries)
    with open(os.path.join(path, "qrels", "test.tsv"), "w") as f:
        if header:
            f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return str(path)
