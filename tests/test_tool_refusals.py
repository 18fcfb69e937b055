"""The tools refuse non-finite output and bad arguments with one `error:` line, exit code 2
and nothing left behind.

One tiny run (6 steps, checkpoints 2, 4, 6) is trained per module. Its step 6 is then
rewritten as a diverged run leaves it: restored, every param scaled by 1e30 (finite in
float32, as the 8.9e20 weights of a run at lr 1e6 were) and saved again through the
project's Checkpointer, so its fingerprints vouch for those values. Every tool then meets
the real thing: the forward pass overflows to NaN, and folding the MEL factors overflows
float32 (1e30 * 1e30 > 3.4e38).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_helpers import copy_run, read_only_dir
from tool_helpers import load_tool
from train_helpers import ROOT, final_params, small_config, subprocess_env

from mlembed_jax.train import run

pytestmark = pytest.mark.integration  # trains a tiny run and starts the tools as commands

CKPTS = "checkpoints"


def _rewrite_params(work: str, cfg, step: int, change) -> None:
    """Checkpoint `step` of `work` replaced by its state with params `change(params)`,
    saved by the Checkpointer training uses (fingerprints of the new values included)."""
    from mlembed_jax.batch import geometry_from_config
    from mlembed_jax.checkpoint.manager import Checkpointer, DataStateBox
    from mlembed_jax.sharding import make_mesh
    from mlembed_jax.train_step import build_step

    # The state's shapes do not depend on the batch: any row bucket will do here.
    fns = build_step(cfg, make_mesh(cfg.mesh), total_steps=6, num_datasets=3,
                     geometries=geometry_from_config(cfg.data, 1, rows=8))
    ckpt = Checkpointer(work)
    state, box, _ = ckpt.restore(step, fns.abstract_state, cfg, DataStateBox())
    state = state.replace(params=change(state.params))
    shutil.rmtree(ckpt.step_dir(step))
    ckpt.manager.reload()
    assert ckpt.save(step, state, box, cfg, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(intact run, diverged copy, config): the diverged copy's step 6 is scaled by 1e30."""
    base = tmp_path_factory.mktemp("refusals")
    work = str(base / "run")
    cfg = small_config(**{"train.max_steps": 6, "train.checkpoint_every": 2,
                          "mesh.num_devices": 1})
    assert run(cfg, work) == 0
    diverged = copy_run(work, str(base / "diverged"))
    _rewrite_params(diverged, cfg, 6, lambda p: jax.tree_util.tree_map(lambda x: x * 1e30, p))
    return work, diverged, cfg


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "RuntimeWarning" not in err, err
    return errors[0]


def _names_the_alternatives(line: str, work: str, flag: str, good=(4, 2),
                            intact: bool = False) -> None:
    """The embedding tools name the checkpoints that embed the failing text finitely (each
    tried); the export (`intact`) those whose params are intact."""
    assert f"checkpoint {work}/{CKPTS}/6 (step 6)" in line, line
    which = "with intact params" if intact else "that embed that text finitely"
    listed = ", ".join(f"{work}/{CKPTS}/{s}" for s in good)
    assert f"other checkpoints {which}: {listed}; pass one of them as {flag}" in line, line


def _files(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), path)
                  for r, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------- non-finite output

def test_encode_refuses_nan_embeddings_and_names_the_intact_checkpoints(runs, tmp_path,
                                                                         capsys):
    from mlembed_jax import encode

    _, diverged, cfg = runs
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\nbonjour\n")
    out = tmp_path / "out" / "e.npy"
    assert encode.main(["--model", diverged, "--input", str(texts), "--output", str(out)]) == 2
    line = _one_error(capsys)
    assert (f"gives NaN/inf (or overflowing) embeddings for 2 of 2 texts (first: {texts}:1; "
            "its largest |weight| is") in line, line
    _names_the_alternatives(line, diverged, "--model")
    assert not (tmp_path / "out").exists()  # nor the directory made for it
    # Diverged for two checkpoints, as rotation under a diverging run leaves it: step 4
    # has intact (finite) params too, but only step 2 embeds finitely, and only it is named.
    both = copy_run(diverged, str(tmp_path / "both"))
    _rewrite_params(both, cfg, 4, lambda p: jax.tree_util.tree_map(lambda x: x * 1e30, p))
    assert encode.main(["--model", both, "--input", str(texts), "--output", str(out)]) == 2
    _names_the_alternatives(_one_error(capsys), both, "--model", good=(2,))
    # The alternative it names encodes finite embeddings.
    assert encode.main(["--model", f"{diverged}/{CKPTS}/4", "--input", str(texts),
                        "--output", str(out)]) == 0
    assert np.isfinite(np.load(out)).all() and np.load(out).shape == (2, 64)


def test_export_refuses_the_overflowing_mel_fold(runs, tmp_path, capsys):
    """The default bf16 export: U @ V overflows float32 before any cast."""
    _, diverged, _ = runs
    export_hf = load_tool("export_hf")
    out = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warning would raise
        assert export_hf.main(["--checkpoint", diverged, "--out", str(out)]) == 2
    line = _one_error(capsys)
    assert ("embed_tokens.weight holds" in line and "after folding the MEL factors (U @ V) "
            "and casting to bfloat16" in line), line
    _names_the_alternatives(line, diverged, "--model", intact=True)
    assert os.listdir(tmp_path) == []  # no export, no .partial directory


def test_export_that_overflows_only_in_bf16_is_an_error(runs, tmp_path, capsys):
    """One weight at 3.4e38: finite in float32 (max 3.40282e38), above bfloat16's largest
    finite value (3.38953e38, ml_dtypes.finfo), so the cast rounds it to inf."""
    import ml_dtypes
    from safetensors.numpy import load_file

    work, _, cfg = runs
    assert np.float32(3.4e38) < np.finfo(np.float32).max
    assert np.float32(3.4e38) > float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    big = copy_run(work, str(tmp_path / "big"))
    _rewrite_params(big, cfg, 6, lambda p: {
        **p, "layers": {**p["layers"], "mlp": {**p["layers"]["mlp"], "up_proj":
                                               p["layers"]["mlp"]["up_proj"].at[1, 0, 0]
                                               .set(3.4e38)}}})
    export_hf = load_tool("export_hf")
    assert export_hf.main(["--checkpoint", big, "--out", str(tmp_path / "fp32"),
                           "--dtype", "fp32"]) == 0
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert fp32["layers.1.mlp.up_proj.weight"][0, 0] == np.float32(3.4e38)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warning would raise
        assert export_hf.main(["--checkpoint", big, "--out", str(tmp_path / "bf16")]) == 2
    line = _one_error(capsys)
    assert ("layers.1.mlp.up_proj.weight holds 1 of 8192 values that are inf or NaN after "
            "casting to bfloat16") in line, line
    assert not any(n.startswith("bf16") for n in os.listdir(tmp_path))


def test_eval_retrieval_refuses_nan_embeddings(runs, tmp_path, capsys):
    _, diverged, _ = runs
    out = tmp_path / "res" / "r.json"
    assert load_tool("eval_retrieval").main(["--model", diverged, "--heldout", "--max_queries", "4",
                                         "--quiet", "--output", str(out)]) == 2
    _names_the_alternatives(_one_error(capsys), diverged, "--model")
    assert not (tmp_path / "res").exists()


def test_matryoshka_report_refuses_nan_embeddings(runs, tmp_path, capsys):
    _, diverged, _ = runs
    out = tmp_path / "report"
    assert load_tool("matryoshka_report").main(["--model", diverged, "--heldout", "--max_queries",
                                            "4", "--quiet", "--out_dir", str(out)]) == 2
    _names_the_alternatives(_one_error(capsys), diverged, "--model")
    assert not out.exists()


def _pairs_file(path) -> str:
    os.makedirs(path)
    pq.write_table(pa.table({"query": ["one", "two", "three"],
                             "passage": ["eins", "zwei", "drei"]}), f"{path}/pairs.parquet")
    return str(path)


def test_miner_refuses_nan_embeddings_and_caches_none(runs, tmp_path, capsys):
    _, diverged, _ = runs
    pairs = _pairs_file(tmp_path / "in")
    cache = tmp_path / "cache"
    assert load_tool("mine_negatives").main(
        ["--model", diverged, "--input", pairs, "--output_dir", str(tmp_path / "mined"),
         "--negatives", "1", "--depth", "2", "--cache_dir", str(cache), "--quiet"]) == 2
    _names_the_alternatives(_one_error(capsys), diverged, "--model")
    assert not (tmp_path / "mined").exists()
    assert not [f for f in _files(cache) if f.startswith("part-")]  # no NaN part cached


def test_as_commands_the_whole_stderr_has_one_error_line(runs, tmp_path):
    """Run as users run them, where absl, XLA and numpy write to the real stderr too."""
    _, diverged, _ = runs
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    env = subprocess_env()
    for argv in ([sys.executable, "-m", "mlembed_jax.encode", "--model", diverged,
                  "--input", str(texts), "--output", str(tmp_path / "e.npy")],
                 [sys.executable, os.path.join(ROOT, "tools", "export_hf.py"),
                  "--checkpoint", diverged, "--out", str(tmp_path / "export")]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1, done.stderr
        assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert os.listdir(tmp_path) == ["texts.txt"]


def test_embedding_store_refuses_a_nan_part_written_before_the_check(runs, tmp_path):
    """A store part holding NaN (as a diverged model wrote them before encode checked) is
    never served: the error names the part to delete."""
    from mlembed_jax import encode
    from mlembed_jax.embedding_store import EmbeddingStore, StoreError

    model = encode.load(runs[0])
    ids = model.tokenize(["one", "two"])
    EmbeddingStore(str(tmp_path), model).embed(ids)
    [part] = [f for f in os.listdir(tmp_path) if f.startswith("part-")
              and not f.endswith(".keys.npy")]
    np.save(tmp_path / part, np.full((2, 64), np.nan, np.float32))
    with pytest.raises(StoreError, match=f"{part} holds NaN/inf embeddings"):
        EmbeddingStore(str(tmp_path), model).embed(ids)


def test_miner_failing_on_its_second_dataset_leaves_no_output(runs, tmp_path, capsys):
    """The second dataset's output path is a directory (a real fault: the write fails
    after the first dataset's file was written): one error line, and neither file stays."""
    work, _, _ = runs
    pairs = _pairs_file(tmp_path / "in")
    shutil.copy(f"{pairs}/pairs.parquet", f"{pairs}/z_pairs.parquet")
    out = tmp_path / "mined"
    os.makedirs(out / "z_pairs.parquet")
    assert load_tool("mine_negatives").main(["--model", work, "--input", pairs, "--output_dir",
                                         str(out), "--negatives", "1", "--depth", "2",
                                         "--if_short", "repeat", "--overwrite",
                                         "--quiet"]) == 2
    assert "z_pairs.parquet" in _one_error(capsys)
    assert _files(out) == []  # pairs.parquet (written first) and the temporary file removed


# ----------------------------------------------------------------- bad arguments

def test_miner_with_an_unwritable_output_dir(runs, tmp_path, capsys):
    work, _, _ = runs
    pairs = _pairs_file(tmp_path / "in")
    with read_only_dir(str(tmp_path / "ro")) as ro:
        assert load_tool("mine_negatives").main(["--model", work, "--input", pairs,
                                             "--output_dir", f"{ro}/mined"]) == 2
        line = _one_error(capsys)
        assert line.startswith(f"error: --output_dir '{ro}/mined' is not writable"), line
        assert os.listdir(ro) == []


def test_prepare_data_max_seq_length_1(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert load_tool("prepare_data").main(["--input_dir", str(tmp_path), "--manifest", "m.json",
                                       "--tokenizer", "t", "--output_dir", str(out),
                                       "--max_seq_length", "1"]) == 2
    line = _one_error(capsys)
    assert line.startswith("error: --max_seq_length 1 is too small"), line
    assert not out.exists()


def test_encode_refuses_an_output_format_before_anything_else(tmp_path, capsys):
    from mlembed_jax import encode

    # Neither the model nor the input exists: the output is what is checked first.
    out = tmp_path / "new" / "x.csv"
    assert encode.main(["--model", str(tmp_path / "no_model"), "--input",
                        str(tmp_path / "no.txt"), "--output", str(out)]) == 2
    line = _one_error(capsys)
    assert line == f"error: --output '{out}' must end in .npy or .parquet (the formats encode " \
        "writes)", line
    assert os.listdir(tmp_path) == []


def test_encode_warns_of_empty_texts_and_notes_truncation(runs, tmp_path, capsys):
    """The demo data's max_seq_length is 64 (EOS included): a 100,000-character text is
    cut to 64 tokens; a blank line still gets its row."""
    from mlembed_jax import encode

    work, _, _ = runs
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n\n" + "word " * 20_000 + "\nshort\n")
    out = tmp_path / "e.npy"
    assert encode.main(["--model", work, "--input", str(texts), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: 1 of 4 texts are empty or blank ({texts}:2)" in err, err
    assert ("note: 1 of 4 texts are longer than max_seq_length=64 tokens (EOS included) and "
            f"were truncated to it, as in training ({texts}:3)") in err, err
    emb = np.load(out)
    assert emb.shape == (4, 64) and np.isfinite(emb).all()
    # The long text's row is the embedding of its first 63 tokens + EOS; one that fits the
    # limit exactly is not reported.
    model = encode.load(work)
    ids = model.tokenize(["word " * 20_000])[0]
    assert len(ids) == 64
    exact = model.tokenizer.decode(ids[:-1])
    assert len(model.tokenize([exact])[0]) == 64
    assert encode.truncated_texts(model, [exact], model.tokenize([exact])) == []
    np.testing.assert_allclose(emb[2], model.encode([exact])[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------- a checkpoint missing its data-iterator file

def test_tools_take_params_whose_only_damage_is_the_data_file(runs, tmp_path, capsys):
    """Training cannot resume from such a step (tests/test_failures.py), but its params are
    verified by their fingerprints, so export and encode take it, with a note."""
    from safetensors.numpy import load_file

    from mlembed_jax import encode
    from mlembed_jax.checkpoint.reader import CheckpointDamaged

    work = copy_run(runs[0], str(tmp_path / "run"))
    os.remove(f"{work}/{CKPTS}/6/data/process_0-of-1.json")
    assert load_tool("export_hf").main(["--checkpoint", work, "--out", str(tmp_path / "export"),
                                    "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert (f"note: checkpoint {work}/{CKPTS}/6: data/process_<i>-of-<n>.json is missing, "
            "so training cannot resume from it") in err, err
    step, params = final_params(work)  # read by Orbax directly
    assert step == 6
    got = load_file(str(tmp_path / "export" / "model.safetensors"))
    np.testing.assert_array_equal(got["norm.weight"], params["norm"]["scale"])
    np.testing.assert_array_equal(got["layers.0.mlp.down_proj.weight"],
                                  np.asarray(params["layers"]["mlp"]["down_proj"][0]).T)
    assert encode.load(work).step == 6
    # Without fingerprints nothing vouches for the params: still refused.
    shutil.rmtree(f"{work}/{CKPTS}/6/integrity")
    with pytest.raises(CheckpointDamaged, match=r"data/process_<i>-of-<n>\.json is missing"):
        encode.load(work)
