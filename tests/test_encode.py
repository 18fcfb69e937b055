"""mlembed_jax.encode: packed, length-sorted encoding equals the plain forward pass in input
order; HF directories match transformers; the CLI; and the errors for bad requests."""

import json
import os
import shutil

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from mlembed_jax import encode as enc
from mlembed_jax.data.packing import plan_batches
from mlembed_jax.data.text_encoding import load_tokenizer
from mlembed_jax.model.encoder import encode as forward
from mlembed_jax.model.encoder import init_params
from mlembed_jax.model.qwen3 import EncoderConfig, padded_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "mlembed_jax", "demo_data")
TOKENIZER = os.path.join(DEMO, "tokenizer")

# A 4-layer model: exits (1, 2, 4), so exit 3 exists but was never trained.
CFG = EncoderConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, mel=True, mel_r_max=32,
                    mel_r_min=8)


@pytest.fixture(scope="module")
def model():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    return enc.Encoder(params=params, cfg=CFG, tokenizer=load_tokenizer(TOKENIZER),
                       max_seq_length=64)


def demo_texts(n=60):
    """Real multilingual names of many lengths, plus edge cases: a duplicate, an empty
    text (just EOS) and one longer than max_seq_length (truncated)."""
    t = pq.read_table(os.path.join(DEMO, "raw", "cldr_names.parquet")).slice(0, n // 2)
    texts = t.column("query").to_pylist() + t.column("passage").to_pylist()
    return texts + [texts[0], "", "lorem ipsum dolor " * 40]


def reference(model, ids, rank, exit, dim):
    """The encoder run directly: one text per row, right-padded, only `exit` layers."""
    L = max(len(t) for t in ids)
    tokens = np.zeros((len(ids), L), np.int32)
    for i, t in enumerate(ids):
        tokens[i, :len(t)] = t
    seg, pos, pool = padded_inputs(tokens, [len(t) for t in ids])
    run = jax.jit(forward, static_argnames=("cfg", "num_layers"))
    pooled = run(model.params, model.cfg, tokens, seg, pos, pool, rank=rank,
                 num_layers=exit)["pooled"][-1]  # the last exit of the cut model = exit
    x = np.asarray(pooled)[:, :dim]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("rank,exit,dim", [(None, None, None), (8, 2, 16)])
def test_encode_equals_direct_forward_in_input_order(model, rank, exit, dim):
    texts = demo_texts()
    ids = model.tokenize(texts)
    assert max(len(t) for t in ids) == 64  # the long text was truncated, EOS kept
    want = reference(model, ids, rank or CFG.mel_r_max, exit or CFG.num_layers,
                     dim or CFG.hidden_size)
    # batch_tokens=16: about one text per batch; 256: several rows of packed texts; 8192:
    # everything in one batch. Sorting and packing differ, the answer must not.
    for batch_tokens in (16, 256, 8192):
        got = model.encode(texts, rank=rank, exit=exit, dim=dim, batch_tokens=batch_tokens)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Permuting the inputs permutes the outputs the same way.
    perm = np.random.default_rng(0).permutation(len(texts))
    got = model.encode([texts[i] for i in perm], rank=rank, exit=exit, dim=dim,
                       batch_tokens=256)
    np.testing.assert_allclose(got, want[perm], atol=2e-5)


def test_plan_batches_packs_every_text_once_without_overlap():
    lengths = np.random.default_rng(1).integers(1, 70, size=300)
    plans = plan_batches(lengths, batch_tokens=512)
    seen = np.concatenate([p.index for p in plans])
    assert sorted(seen) == list(range(300))
    # Longest first: a batch never holds a text longer than any text of an earlier batch.
    firsts = [lengths[p.index].max() for p in plans]
    assert firsts == sorted(firsts, reverse=True)
    for p in plans:
        assert p.num_rows * p.seq_len <= max(512, p.seq_len)
        used = np.zeros((p.num_rows, p.seq_len), int)
        for j, r, o in zip(p.index, p.rows, p.offsets):
            used[r, o:o + lengths[j]] += 1
        assert used.max() == 1  # no two texts share a cell
    # Packing pays: far fewer cells than one padded row per text would take.
    cells = sum(p.num_rows * p.seq_len for p in plans)
    assert cells < 0.6 * 300 * 128


def test_encode_exits_is_one_pass_of_the_same_numbers(model):
    texts = demo_texts(20)
    both = model.encode_exits(model.tokenize(texts), [1, 4], rank=16)
    for e in (1, 4):
        np.testing.assert_allclose(both[e], model.encode(texts, rank=16, exit=e), atol=2e-5)
    np.testing.assert_allclose(enc.normalize(both[4], 8), model.encode(texts, rank=16, dim=8),
                               atol=2e-5)


def test_bad_requests_get_clear_errors(model):
    cases = [(dict(rank=12), "not a trained MEL rank (8, 16, 32)"),
             (dict(rank=33, allow_untrained=True), "outside [1, r_max=32]"),
             (dict(exit=3), "not one of the model's MLL exits (1, 2, 4)"),
             (dict(exit=5, allow_untrained=True), "outside [1, L=4]"),
             (dict(dim=100), "not one of the trained MRL dims"),
             (dict(dim=65, allow_untrained=True), "outside [1, d=64]"),
             (dict(dim=2.5), "must be an integer")]
    for kw, message in cases:
        with pytest.raises(enc.EncodeError, match=message.replace("(", r"\(").replace(
                ")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            model.encode(["x"], **kw)
    # The override really opens the untrained points.
    assert model.encode(["x"], rank=12, exit=3, dim=40, allow_untrained=True).shape == (1, 40)
    with pytest.raises(enc.EncodeError, match="list of strings"):
        model.encode("one string")
    with pytest.raises(enc.EncodeError, match="outside"):
        model.encode_ids([[1, 5000]])
    with pytest.raises(enc.EncodeError, match="does not exist"):
        enc.load("/nonexistent/model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random HF Qwen3 saved by transformers, with the demo tokenizer beside it."""
    from hf_helpers import make_hf_qwen3

    d = tmp_path_factory.mktemp("hf")
    torch_model = make_hf_qwen3(str(d), vocab_size=4096, num_hidden_layers=3)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), d)
    return str(d), torch_model


def test_hf_directory_matches_transformers(hf_dir):
    import torch

    path, torch_model = hf_dir
    model = enc.load(path)
    assert model.exits == (1, 2, 3) and not model.cfg.mel
    texts = demo_texts(10)
    got = model.encode(texts, exit=2, dim=32, batch_tokens=128)
    for text, row in zip(texts, got):
        ids = torch.tensor(model.tokenize([text])[0][None].astype(np.int64))
        with torch.no_grad():
            out = torch_model(ids, output_hidden_states=True)
        # hidden_states[2] is the output of layer 2, before the final norm; the exit applies
        # the model's final RMSNorm to it (the recipe), here with torch's own norm module.
        with torch.no_grad():
            h = torch_model.norm(out.hidden_states[2])[0, -1, :32].numpy()
        np.testing.assert_allclose(row, h / np.linalg.norm(h), atol=1e-4)
    with pytest.raises(enc.EncodeError, match="plain token embedding"):
        model.encode(["x"], rank=8)


def test_cli_writes_npy_and_parquet_in_input_order(hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    texts = demo_texts(12)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                           for i, t in enumerate(texts)))
    assert enc.main([f"--model={path}", f"--input={src}", f"--output={tmp_path}/e.parquet",
                     "--exit=1", "--dim=16", "--batch_tokens=64"]) == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(len(texts))]
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    want = enc.load(path).encode(texts, exit=1, dim=16)
    np.testing.assert_allclose(emb, want, atol=1e-5)

    plain = tmp_path / "in.txt"
    plain.write_text("\n".join(texts[:5]) + "\n")
    assert enc.main([f"--model={path}", f"--input={plain}", f"--output={tmp_path}/e.npy"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (5, 64)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    assert enc.main([f"--model={path}", f"--input={bad}", f"--output={tmp_path}/x.npy"]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert enc.main([f"--model={path}", f"--input={bad}", f"--output={tmp_path}/x.npy"]) == 2
    assert f"{bad}:2: no string field 'text'" in capsys.readouterr().err
    assert enc.main([f"--model={path}", f"--input={src}", f"--output={tmp_path}/x.npy",
                     "--exit=7"]) == 2
    assert "exit=7 is not one of the model's MLL exits (1, 2, 3)" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow  # test_export checks the export against the JAX forward too
def test_exported_model_encodes_like_its_checkpoint(tmp_path_factory, tmp_path):
    """tools/export_hf's output (a cut, compatibility-mode HF + sentence-transformers
    directory) loads here and gives the checkpoint's embeddings at the exported point."""
    from retrieval_helpers import trained_names_run

    from mlembed_jax.export import export_checkpoint

    work, _ = trained_names_run(tmp_path_factory.getbasetemp())
    out = str(tmp_path / "export")
    export_checkpoint(work, out, rank=16, layers=1, dim=32, mode="compat", dtype="fp32")
    exported = enc.load(out)
    assert exported.exits == (1,) and exported.default_dim == 32
    texts = demo_texts(16)
    want = enc.load(work).encode(texts, rank=16, exit=1, dim=32)
    np.testing.assert_allclose(exported.encode(texts), want, atol=1e-5)


@pytest.mark.integration
def test_a_gpu_trained_checkpoint_encodes_here_with_the_portable_kernel(
        tmp_path_factory, monkeypatch, capsys):
    """A checkpoint whose config names a GPU-only kernel loads on CPU with `dense`, says so,
    and gives the same embeddings; naming that kernel explicitly is a clear error."""
    from retrieval_helpers import trained_names_run

    from mlembed_jax.checkpoint import reader as checkpoint

    work, _ = trained_names_run(tmp_path_factory.getbasetemp())
    texts = demo_texts(8)
    want = enc.load(work).encode(texts)
    real = checkpoint.load_params

    def as_if_trained_on_gpu(path):
        config, params, step = real(path)
        with config.unlocked():
            config.model.attention = "cudnn"
        return config, params, step

    monkeypatch.setattr(checkpoint, "load_params", as_if_trained_on_gpu)
    capsys.readouterr()
    got = enc.load(work)
    assert got.cfg.attention == "dense"
    assert "trained with attention='cudnn', which cannot run on this cpu" in \
        capsys.readouterr().err
    np.testing.assert_allclose(got.encode(texts), want, atol=1e-6)
    with pytest.raises(enc.EncodeError, match="'cudnn' runs on NVIDIA GPUs only"):
        enc.load(work, attention="cudnn")


@pytest.mark.integration
def test_a_tpu_trained_checkpoint_and_auto_encode_here(tmp_path_factory, monkeypatch, capsys):
    """A checkpoint trained with splash (TPU) encodes on CPU with `dense`, saying so, and
    attention="auto" picks this platform's kernel as training would."""
    from retrieval_helpers import trained_names_run

    from mlembed_jax.checkpoint import reader as checkpoint

    work, _ = trained_names_run(tmp_path_factory.getbasetemp())
    texts = demo_texts(8)
    want = enc.load(work).encode(texts)
    real = checkpoint.load_params

    def as_if_trained_on_tpu(path):
        config, params, step = real(path)
        with config.unlocked():
            config.model.attention = "splash"
        return config, params, step

    monkeypatch.setattr(checkpoint, "load_params", as_if_trained_on_tpu)
    capsys.readouterr()
    got = enc.load(work)
    assert got.cfg.attention == "dense"
    assert "trained with attention='splash', which cannot run on this cpu" in \
        capsys.readouterr().err
    np.testing.assert_allclose(got.encode(texts), want, atol=1e-6)
    auto = enc.load(work, attention="auto")
    assert auto.cfg.attention == "dense"
    # Rows of 128 are one block: auto passes over dense_blocks, saying so.
    err = capsys.readouterr().err
    assert "attention dense (auto: the portable XLA reference on cpu" in err
    assert "passed over dense_blocks: rows of 128 tokens are one block" in err
