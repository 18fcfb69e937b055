"""Every path a user names may be gs://: checked against a real GCS JSON-API server
(fake-gcs-server, in memory) that conftest's `gcs` fixture starts on a free port. The clients
are the real ones (gcsfs through etils.epath, TensorStore under Orbax, tensorboardX's GCS
writer); only their endpoint is the local server.

One round trip with every path in the bucket: prepare_data -> train -> SIGTERM -> resume
(equal to an uninterrupted run) -> export_hf -> encode and eval_retrieval; then the
one-line errors of a missing bucket or object and of bad credentials.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from gcs_helpers import BUCKET
from retrieval_helpers import write_beir
from tool_helpers import load_tool
from train_helpers import cli_args, final_params, small_config, subprocess_env, train_losses

from mlembed_jax.config import ConfigError
from mlembed_jax.data import DEMO_DATA_DIR, DEMO_MANIFEST, DEMO_TOKENIZER

pytestmark = pytest.mark.integration  # trains against a storage server in a subprocess

def _upload(local: str, url: str) -> None:
    from etils import epath

    epath.Path(url).write_bytes(open(local, "rb").read())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# absl/glog's C++ line format: severity letter, MMDD hh:mm:ss.micros, thread, file:line].
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] ")
# TensorStore logs, at INFO and once per process, which credentials it uses (every path of
# its google_auth_provider.cc does: the testing token here, "Using credentials at ..." with
# application-default credentials, "Running on GCE ..." on a VM). Its absl copy is linked
# privately and reads no environment variable for the log level (TensorStore 0.1.86), so
# this one line cannot be switched off from Python; any other glog line is a failure.
_TENSORSTORE_AUTH = re.compile(r"google_auth_provider\.cc:\d+\] (Using |Running on GCE)")


def _glog_noise(stderr: str) -> list[str]:
    """The C++ log lines on a run's stderr, other than TensorStore's credentials line."""
    return [ln for ln in stderr.splitlines()
            if _GLOG.match(ln) and not (ln.startswith("I") and _TENSORSTORE_AUTH.search(ln))]


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_prepare_train_sigterm_resume_export_encode_all_on_gcs(gcs, tmp_path, capsys):
    eval_retrieval = load_tool("eval_retrieval")
    export_hf = load_tool("export_hf")
    prepare_data = load_tool("prepare_data")

    from mlembed_jax import encode, storage

    root = f"gs://{BUCKET}/round-trip"
    for name in sorted(os.listdir(os.path.join(DEMO_DATA_DIR, "raw"))):
        _upload(os.path.join(DEMO_DATA_DIR, "raw", name), f"{root}/raw/{name}")
    _upload(DEMO_MANIFEST, f"{root}/manifest.json")
    assert prepare_data.main([f"--input_dir={root}/raw", f"--manifest={root}/manifest.json",
                              f"--tokenizer={DEMO_TOKENIZER}", f"--output_dir={root}/prepared",
                              "--max_seq_length=64", "--workers=1"]) == 0
    data = {"data.prepared_dir": f"{root}/prepared", "data.manifest": f"{root}/manifest.json"}

    # The reference: the same run uninterrupted, its workdir local (data still in the bucket).
    # The three runs share the session's compilation cache (conftest), so only one compiles.
    # Enough steps that 0.3 s after compiling is mid-run: 30 once all ran within it.
    steps = 150
    kw = {**data, "train.max_steps": steps, "train.checkpoint_every": 1000}
    env = subprocess_env()
    straight = subprocess.run(cli_args(tmp_path / "straight", **kw), env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    work = f"{root}/run"
    proc = subprocess.Popen(cli_args(work, **kw), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # metrics.jsonl only reaches the bucket at saves (or once a minute), so the stdout line
    # after compiling says when the steps begin; 0.3 s is a few of the steps.
    for line in proc.stdout:
        if line.startswith("compiled"):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert _glog_noise(err) == [], err[-3000:]
    stopped_at = max(int(d) for d in storage.listdir(f"{work}/checkpoints") if d.isdigit())
    assert stopped_at < steps, "SIGTERM must land mid-run for this test to mean anything"

    resumed = subprocess.run(cli_args(work, **kw), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _glog_noise(resumed.stderr) == [], resumed.stderr[-3000:]
    assert f"resumed from {work}/checkpoints/{stopped_at}" in resumed.stdout
    a, b = train_losses(tmp_path / "straight"), train_losses(work)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    (sa, pa), (sb, pb) = final_params(tmp_path / "straight"), final_params(work)
    assert sa == sb == steps
    for x, y in zip(_leaves(pa), _leaves(pb)):
        np.testing.assert_array_equal(x, y)
    assert storage.isfile(f"{work}/run_config.json")
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{work}/tensorboard"))

    export = f"{root}/export"
    assert export_hf.main(["--checkpoint", work, "--out", export, "--dtype", "fp32"]) == 0
    assert {"model.safetensors", "tokenizer.json", "modules.json", "README.md"} <= set(
        storage.listdir(export))

    texts = ["Tuesday", "Germany", "calendar: Monday"]
    storage.write_text_atomic("\n".join(texts), f"{root}/texts.txt")
    assert encode.main(["--model", export, "--input", f"{root}/texts.txt", "--output",
                        f"{root}/emb.npy"]) == 0
    with storage.open(f"{root}/emb.npy", "rb") as f:
        exported = np.load(f)
    trained = encode.load(work).encode(texts)
    np.testing.assert_allclose(exported, trained, atol=1e-4)

    beir = write_beir(tmp_path / "beir", [{"_id": f"d{i}", "text": t} for i, t in
                                          enumerate(texts)],
                      [{"_id": "q0", "text": "Tuesday"}], [("q0", "d0", 1)])
    for dirpath, _, files in os.walk(beir):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), beir)
            _upload(os.path.join(beir, rel), f"{root}/beir/{rel}")
    capsys.readouterr()
    assert eval_retrieval.main([f"--model={export}", f"--beir_dir={root}/beir", "--quiet"]) == 0
    assert "beir: nDCG@10" in capsys.readouterr().out


def test_missing_bucket_object_and_bad_credentials_are_one_line_errors(gcs, tmp_path, capsys,
                                                                        monkeypatch):
    export_hf = load_tool("export_hf")
    prepare_data = load_tool("prepare_data")

    from mlembed_jax import encode
    from mlembed_jax.train import run

    with pytest.raises(ConfigError, match=r"^--workdir 'gs://no-such-bucket/run': bucket "
                       r"gs://no-such-bucket does not exist") as e:
        run(small_config(), "gs://no-such-bucket/run")
    assert "\n" not in str(e.value)

    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    missing = f"gs://{BUCKET}/no-such-run"
    cases = [
        (lambda: export_hf.main(["--checkpoint", missing, "--out", str(tmp_path / "x")]),
         f"checkpoint '{missing}' does not exist"),
        (lambda: export_hf.main(["--checkpoint", "gs://no-such-bucket/run", "--out",
                                 str(tmp_path / "x")]), "bucket gs://no-such-bucket does not"),
        (lambda: encode.main(["--model", missing, "--input", str(texts), "--output",
                              str(tmp_path / "e.npy")]), f"model path '{missing}' does not"),
        (lambda: prepare_data.main(["--input_dir", f"gs://{BUCKET}/no-such-dir", "--manifest",
                                    DEMO_MANIFEST, "--tokenizer_dir", DEMO_TOKENIZER,
                                    "--output_dir", str(tmp_path / "p")]),
         f"input directory 'gs://{BUCKET}/no-such-dir' does not exist"),
    ]
    for tool, message in cases:
        assert tool() == 2
        assert message in _one_error_line(capsys)

    bad = tmp_path / "key.json"
    bad.write_text("{not json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(bad))
    assert export_hf.main(["--checkpoint", f"gs://{BUCKET}/run", "--out",
                           str(tmp_path / "x")]) == 2
    assert f"GOOGLE_APPLICATION_CREDENTIALS='{bad}' does not hold usable credentials" in \
        _one_error_line(capsys)
