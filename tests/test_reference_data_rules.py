"""The data rules of the reference run (ML-Embed run.py, commit 1c52915), checked against that
code's own lines transcribed here, or against the library it calls: dataset names, the
held-out split, which dataset each step draws, and the hard-negative columns of a step."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import TOKENIZER, data_config
from train_helpers import ROOT, subprocess_env

from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.data.prepare import prepare_data
from mlembed_jax.metrics_log import MetricsWriter, flatten, read_metrics

REFERENCE_NAMES = list(manifest_lib.reference_task_types())
ODD_NAMES = ["xcodeeval_code2code_C#", "xcodeeval_code2code_C++", "xcodeeval_nl2code_C#",
             "xcodeeval_nl2code_C++"]


# ---------------------------------------------------------------------------- 1: names
def test_all_502_reference_names_pass_the_manifest_check():
    assert len(REFERENCE_NAMES) == 502 and set(ODD_NAMES) <= set(REFERENCE_NAMES)
    specs = manifest_lib.parse_manifest({n: "retrieval" for n in REFERENCE_NAMES})
    assert list(specs) == REFERENCE_NAMES


@pytest.mark.parametrize("name", ["a/b", ".hidden", "a b", "", "tab\tname", "-x", "../up"])
def test_names_that_are_no_safe_file_name_are_still_refused(name):
    with pytest.raises(manifest_lib.ManifestError, match="names may hold letters, digits"):
        manifest_lib.parse_manifest({name: "retrieval"})


@pytest.fixture(scope="module")
def released_502(tmp_path_factory):
    """tools/make_manifest.py over one recipe-format file per reference dataset (query,
    passage, negative_1..24; one row each, since prepare_data refuses an empty dataset),
    then prepare_data with that manifest. Returns (prepared dir, manifest path)."""
    root = tmp_path_factory.mktemp("released502")
    raw = root / "raw"
    raw.mkdir()
    cols = ["query", "passage"] + [f"negative_{j}" for j in range(1, 25)]
    for name in REFERENCE_NAMES:
        pq.write_table(pa.table({c: [f"{name} {c}"] for c in cols}), str(raw / f"{name}.parquet"))
    manifest = root / "manifest.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_manifest.py"),
                        f"--input_dir={raw}", f"--out={manifest}"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "502 datasets" in r.stdout
    out = root / "prep"
    res = prepare_data(str(raw), str(manifest), TOKENIZER, str(out), max_seq_length=32,
                       workers=1, verbose=False)
    assert sorted(res.datasets) == sorted(REFERENCE_NAMES)
    return str(out), str(manifest)


def test_make_manifest_over_the_502_reference_files_is_accepted_by_prepare_data(released_502):
    out, manifest = released_502
    m = json.loads(open(manifest).read())
    assert sorted(m) == sorted(REFERENCE_NAMES)
    for name in ODD_NAMES:  # file names too
        assert os.path.exists(os.path.join(out, f"{name}_query.parquet"))
        assert os.path.exists(os.path.join(out, f"{name}.done"))


def read_tensorboard_tags(logdir: str) -> dict[str, float]:
    """tag -> last value of every scalar in the event files (TFRecord framing: length u64,
    its crc u32, the Event proto, its crc u32)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                tags[v.tag] = v.simple_value
    return tags


def test_odd_names_train_and_keep_their_names_in_metrics_and_tensorboard(released_502,
                                                                         tmp_path):
    """Every reference dataset trains under its own name, and the per-dataset metric keys of
    metrics.jsonl and the TensorBoard tags are exactly train.py's f"train/loss_by_dataset/
    {name}" and flatten's f"val/dataset_loss/{name}" (tensorboardX's add_scalar would have
    turned C# and C++ into C_ and C__)."""
    out, manifest = released_502
    cfg = data_config(out, manifest=manifest, seq_len=32, max_seq_length=32,
                      samples_per_pack=1, max_negatives=9)
    it = make_train_iterator(cfg, packs=1)
    names = list(it.dataset_names)
    drawn = [next(it)[1]["dataset"] for _ in range(it.steps_per_epoch)]
    assert sorted(drawn) == sorted(REFERENCE_NAMES)  # one row each: one step each

    values = {f"train/loss_by_dataset/{n}": float(i) for i, n in enumerate(ODD_NAMES)}
    values.update(flatten("val/", {"dataset_loss": np.arange(len(names), dtype=float)}, names))
    writer = MetricsWriter(str(tmp_path), start_step=0)
    writer.write(1, values)
    writer.close()
    (row,) = read_metrics(str(tmp_path))
    assert {k: v for k, v in row.items() if k != "step"} == values
    assert read_tensorboard_tags(str(tmp_path / "tensorboard")) == values
    for n in ODD_NAMES:
        assert values[f"val/dataset_loss/{n}"] == names.index(n)
