"""tools/export_hf.py: a model trained here, exported, loaded by plain transformers and
sentence-transformers, must embed exactly as our JAX encoder does, at every (R, K, M) cut.

One tiny model (3 layers, exits (1, 3), MEL r_max 32, d 64) is trained for a few steps with a
high learning rate, so no weight (norm scales included) is still at its init value and a
tensor written to the wrong place cannot hide. It is exported once per size below; the tests
then read those directories.
"""

from __future__ import annotations

import json
import os
import shutil
import types
import warnings

import numpy as np
import pytest
from export_helpers import InputRecorder, hf_last_token, jax_embeddings, normalize
from tool_helpers import load_tool
from train_helpers import ROOT, small_config

pytestmark = pytest.mark.integration  # its fixture trains the model every test exports

TOKENIZER = os.path.join(ROOT, "mlembed_jax", "demo_data", "tokenizer")
PREPARED = os.path.join(ROOT, "mlembed_jax", "demo_data", "prepared")
MAX_LEN = 64  # the demo data's max_seq_length
R_MAX, L, D = 32, 3, 64

# Texts of different lengths, so every batch is padded; the last one is truncated.
TEXTS = ["Hello world", "Grüße aus Köln, und noch ein paar Wörter mehr", "東京",
         "calendar: Tuesday", "Un texte en français sur les jours de la semaine",
         " ".join(["embedding"] * 100)]

# name -> (export kwargs, (R, K, M)). "full" is the trained size; "cut" a small trained exit
# (factorized, sharded); "mid" a depth that is no trained exit (exported with a warning).
EXPORTS = {
    "full": (dict(dtype="fp32"), (R_MAX, L, D)),
    "cut": (dict(rank=8, layers=1, dim=16, dtype="fp32", mode="factorized",
                 max_shard_bytes=100_000), (8, 1, 16)),
    "mid": (dict(rank=16, layers=2, dim=32, dtype="fp32"), (16, 2, 32)),
    "bf16": (dict(dtype="bf16"), (R_MAX, L, D)),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains the tiny model (a few steps) and exports it at every size in EXPORTS."""
    from mlembed_jax.checkpoint.reader import load_trained
    from mlembed_jax.data import text_encoding
    from mlembed_jax.export import ExportWarning, export_checkpoint
    from mlembed_jax.model.qwen3 import EncoderConfig
    from mlembed_jax.train import run

    workdir = str(tmp_path_factory.mktemp("run"))
    config = small_config(**{
        "model.num_layers": L, "model.exits": (1, L), "train.max_steps": 3,
        "mesh.num_devices": 1, "optim.lr": 1e-2, "optim.warmup_steps": 1})
    assert run(config, workdir) == 0
    config, params, step = load_trained(workdir)
    out = tmp_path_factory.mktemp("exports")
    dirs, caught = {}, {}
    for name, (kwargs, _) in EXPORTS.items():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", ExportWarning)
            dirs[name] = export_checkpoint(workdir, str(out / name), **kwargs)["out_dir"]
        caught[name] = [str(x.message) for x in w if issubclass(x.category, ExportWarning)]
    tok = text_encoding.load_tokenizer(TOKENIZER)
    return types.SimpleNamespace(
        workdir=workdir, config=config, params=params, step=step,
        enc=EncoderConfig.from_config(config.model), dirs=dirs, warnings=caught,
        ids=text_encoding.encode_texts(tok, TEXTS, MAX_LEN), tok=tok, out=out)


def test_training_moved_every_norm(trained):
    # Norm scales start at exactly 1; a missed or misplaced one must change the output.
    for path in (("norm", "scale"), ("layers", "input_layernorm", "scale"),
                 ("layers", "self_attn", "q_norm", "scale")):
        node = trained.params
        for k in path:
            node = node[k]
        assert not np.any(node == 1.0), path


@pytest.mark.parametrize("name", ["full", "cut", "mid"])
def test_transformers_automodel_matches_jax(trained, name):
    rank, layers, _ = EXPORTS[name][1]
    want = jax_embeddings(trained.params, trained.enc, trained.ids, rank, layers)
    got = hf_last_token(trained.dirs[name], trained.ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["full", "cut", "mid"])
def test_sentence_transformers_matches_jax(trained, name):
    from sentence_transformers import SentenceTransformer

    rank, layers, dim = EXPORTS[name][1]
    full = jax_embeddings(trained.params, trained.enc, trained.ids, rank, layers)
    want = normalize(full[:, :dim])
    model = SentenceTransformer(trained.dirs[name], device="cpu")
    assert model.get_embedding_dimension() == dim
    for side in ("right", "left"):
        model.tokenizer.padding_side = side
        rec = InputRecorder(model)
        got = model.encode(TEXTS, batch_size=len(TEXTS), normalize_embeddings=True)
        rec.close()
        # encode saw a padded batch, padded on this side, holding exactly the training ids.
        (_, mask), = rec.calls
        pad_col = 0 if side == "left" else -1
        assert mask[:, pad_col].min() == 0, f"no {side} padding in the batch"
        assert sorted(rec.texts_ids()) == sorted(x.tolist() for x in trained.ids)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=side)
        # Without normalize_embeddings, sentence-transformers cuts the unit vector after its
        # Normalize module (what the model card says): same direction, not unit length.
        plain = model.encode(TEXTS, batch_size=len(TEXTS))
        np.testing.assert_allclose(plain, normalize(full)[:, :dim], atol=1e-4, rtol=0)


def test_prompts_give_the_prepared_training_ids(trained):
    """The manifest's query prefix is a prompt; encode with it sees the very ids that
    tools/prepare_data.py stored for those queries (cldr_calendar has prefix "calendar: ")."""
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    queries = pq.read_table(os.path.join(ROOT, "mlembed_jax", "demo_data", "raw",
                                         "cldr_calendar.parquet")).column("query").to_pylist()[:12]
    stored = pq.read_table(os.path.join(PREPARED, "cldr_calendar_query.parquet")).column(
        "query_input_ids").to_pylist()[:12]
    model = SentenceTransformer(trained.dirs["full"], device="cpu")
    assert model.prompts["cldr_calendar_query"] == "calendar: "
    rec = InputRecorder(model)
    got = model.encode(queries, prompt_name="cldr_calendar_query", batch_size=len(queries),
                       normalize_embeddings=True)
    rec.close()
    assert sorted(rec.texts_ids()) == sorted(stored)
    want = jax_embeddings(trained.params, trained.enc, [np.asarray(s) for s in stored], R_MAX, L)
    np.testing.assert_allclose(got, normalize(want), atol=1e-4, rtol=0)


def test_tokenizer_ids_equal_prepare_data(trained, tmp_path):
    """AutoTokenizer of the export == text_encoding.encode_texts (what prepare_data runs),
    also from a source tokenizer that appends no EOS itself (as Qwen3's does not): the export
    must add it, not assume it."""
    from transformers import AutoTokenizer

    from mlembed_jax.data.text_encoding import encode_texts
    from mlembed_jax.export import ExportWarning, export_checkpoint
    from mlembed_jax.export.tokenizer_files import probe_texts

    texts = TEXTS + probe_texts(MAX_LEN)
    want = [x.tolist() for x in encode_texts(trained.tok, texts, MAX_LEN)]
    got = AutoTokenizer.from_pretrained(trained.dirs["full"])(texts, truncation=True)
    assert got["input_ids"] == want
    assert max(len(x) for x in got["input_ids"]) == MAX_LEN  # the long text was truncated

    bare = tmp_path / "bare_tokenizer"
    shutil.copytree(TOKENIZER, bare)
    tj = json.loads((bare / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False,
                            "trim_offsets": False, "use_regex": True}
    (bare / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({**tc, "add_bos_token": False}))
    assert AutoTokenizer.from_pretrained(str(bare))("Hello")["input_ids"][-1] != 1  # no EOS

    with pytest.warns(ExportWarning, match="not byte-identical"):
        out = export_checkpoint(trained.workdir, str(tmp_path / "exp"),
                                tokenizer_dir=str(bare), dtype="fp32")["out_dir"]
    assert AutoTokenizer.from_pretrained(out)(texts, truncation=True)["input_ids"] == want


def test_round_trip_jax_hf_jax(trained):
    """Export then hf_import.load_hf_params gives back the trained params: every layer
    tensor bit for bit, the embedding as the folded MEL table; the factorized file holds
    U[:, :R] and V[:R] bit for bit."""
    import dataclasses

    import jax

    from mlembed_jax.export import fold_mel
    from mlembed_jax.model.hf_import import encoder_config_from_hf, load_hf_params
    from mlembed_jax.model.safetensors_io import SafetensorsFile

    p, enc = trained.params, trained.enc
    u, v = p["embed_tokens"]["U"], p["embed_tokens"]["V"]
    for name in ("full", "cut"):
        rank, layers, _ = EXPORTS[name][1]
        cfg = encoder_config_from_hf(trained.dirs[name], mel=False)
        # config.json describes the trained model cut to K layers.
        assert cfg == dataclasses.replace(enc.truncated(layers), mel=False,
                                          mel_r_max=cfg.mel_r_max, mel_r_min=cfg.mel_r_min,
                                          exits=cfg.exits)
        back = load_hf_params(trained.dirs[name], cfg)
        np.testing.assert_array_equal(back["norm"]["scale"], p["norm"]["scale"])
        want_layers = jax.tree_util.tree_map(lambda x: x[:layers], p["layers"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, back["layers"], want_layers)
        table = back["embed_tokens"]["embedding"]
        np.testing.assert_array_equal(table, fold_mel(u, v, rank))
        np.testing.assert_allclose(table, u[:, :rank] @ v[:rank], atol=1e-6, rtol=0)

    factors = SafetensorsFile(os.path.join(trained.dirs["cut"], "mel_factors.safetensors"))
    np.testing.assert_array_equal(factors.read("embed_tokens.U"), u[:, :8])
    np.testing.assert_array_equal(factors.read("embed_tokens.V"), v[:8])


def test_bf16_export_is_the_rounded_fp32_export(trained):
    """Every bf16 tensor is the fp32 export's tensor rounded to bf16, and the model embeds
    within bf16 tolerance of the fp32 JAX encoder."""
    import ml_dtypes

    from mlembed_jax.model.safetensors_io import SafetensorsFile

    b16 = SafetensorsFile(os.path.join(trained.dirs["bf16"], "model.safetensors"))
    f32 = SafetensorsFile(os.path.join(trained.dirs["full"], "model.safetensors"))
    assert sorted(b16.names()) == sorted(f32.names())
    for n in f32.names():
        assert b16.dtype(n) == ml_dtypes.bfloat16
        np.testing.assert_array_equal(b16.read(n), f32.read(n).astype(ml_dtypes.bfloat16))
    want = jax_embeddings(trained.params, trained.enc, trained.ids, R_MAX, L)
    got = hf_last_token(trained.dirs["bf16"], trained.ids)
    cos = np.sum(normalize(got) * normalize(want), axis=-1)
    assert cos.min() > 0.999, cos
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)


def test_directory_contents(trained):
    """config.json is a plain Qwen3Model at depth K; sentence-transformers files as issued;
    sharding with an index when the weights exceed one shard; model card records the cut."""
    from mlembed_jax.metrics_log import read_metrics

    for name, (kwargs, (rank, layers, dim)) in EXPORTS.items():
        d = trained.dirs[name]
        cfg = json.loads(open(os.path.join(d, "config.json")).read())
        assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3Model"]
        assert cfg["num_hidden_layers"] == layers
        assert cfg["tie_word_embeddings"] is trained.config.model.tie_word_embeddings
        assert cfg["eos_token_id"] == 1
        st = json.loads(open(os.path.join(d, "config_sentence_transformers.json")).read())
        assert st["truncate_dim"] == (dim if dim < D else None)
        assert st["similarity_fn_name"] == "cosine"
        pooling = json.loads(open(os.path.join(d, "1_Pooling", "config.json")).read())
        assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
        modules = json.loads(open(os.path.join(d, "modules.json")).read())
        assert [m["type"].rsplit(".", 1)[-1] for m in modules] == [
            "Transformer", "Pooling", "Normalize"]
        card = open(os.path.join(d, "README.md")).read()
        assert f"| MEL rank R (token embedding U[:, :R] @ V[:R]) | {rank} |" in card
        assert f"| layers K (MLL exit) | {layers} |" in card
        assert f"| output dim M (MRL) | {dim} |" in card
        for dataset in ("cldr_names", "cldr_kinds", "cldr_calendar"):
            assert f"| {dataset} |" in card
        final = [m for m in read_metrics(trained.workdir) if "train/total" in m][-1]
        assert f"| train/total | {final['train/total']:.4g} |" in card
        assert ('"mel_r_max": 32' in card) and (("## Factorized" in card) == (name == "cut"))
    files = sorted(os.listdir(trained.dirs["cut"]))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert "mel_factors.safetensors" in files
    assert sorted(os.listdir(trained.out)) == sorted(EXPORTS)  # no partial dirs left over


def test_factorized_snippet_from_the_card_works(trained):
    """The model card's memory-saving recipe (U, V instead of the table) runs as written and
    embeds as the folded model does."""
    from sentence_transformers import SentenceTransformer

    from mlembed_jax.export.model_card import FACTORIZED_SNIPPET

    d = trained.dirs["cut"]
    scope = {}
    exec(FACTORIZED_SNIPPET.replace("PATH/TO/THIS/DIR", d), scope)
    swapped = scope["model"]
    assert type(swapped[0].auto_model.get_input_embeddings()).__name__ == "FactorizedEmbedding"
    plain = SentenceTransformer(d, device="cpu")
    np.testing.assert_allclose(swapped.encode(TEXTS, normalize_embeddings=True),
                               plain.encode(TEXTS, normalize_embeddings=True), atol=1e-5)


def test_depth_that_is_no_exit_warns(trained):
    assert any("not one of the model's MLL exits" in w for w in trained.warnings["mid"])
    assert not trained.warnings["full"] and not trained.warnings["cut"]


def test_streaming_reader_matches_load_trained(trained):
    import jax

    from mlembed_jax.checkpoint.reader import TrainedParams

    # Every spelling of --checkpoint: WORKDIR, WORKDIR/STEP, WORKDIR/checkpoints/STEP.
    step = str(trained.step)
    for path in (os.path.join(trained.workdir, step),
                 os.path.join(trained.workdir, "checkpoints", step)):
        assert TrainedParams(path).step == trained.step
        assert os.path.samefile(TrainedParams(path).workdir, trained.workdir)
    reader = TrainedParams(trained.workdir)
    flat = jax.tree_util.tree_flatten_with_path(trained.params)[0]
    assert set(reader.leaves) == {tuple(k.key for k in p) for p, _ in flat}
    for path, x in flat:
        np.testing.assert_array_equal(reader.read(tuple(k.key for k in path)), x)


def test_tie_flag_follows_the_backbone(trained):
    import dataclasses

    from mlembed_jax.export.hf_export import hf_config

    special = {"eos_token_id": 1, "pad_token_id": 0}
    for tied in (True, False):
        enc = dataclasses.replace(trained.enc, tie_word_embeddings=tied)
        assert hf_config(enc, 2, "bf16", special, 128)["tie_word_embeddings"] is tied


# ----------------------------------------------------------------------------- bad input
def _cli(argv, capsys):
    mod = load_tool("export_hf")
    code = mod.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--rank", "64"], "--rank 64: rank=64 is outside [1, r_max=32]"),
    (["--exit", "4"], "--exit 4: exit=4 is outside [1, L=3]"),
    (["--layers", "4"], "--exit 4: exit=4 is outside [1, L=3]"),  # the old name of --exit
    (["--dim", "65"], "--dim 65: dim=65 is outside [1, d=64]"),
    (["--rank", "0", "--exit", "0"], "--exit 0: exit=0 is outside"),  # every error at once
])
def test_cli_rejects_impossible_sizes(trained, tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    code, err = _cli(["--model", trained.workdir, "--output_dir", str(out)] + extra, capsys)
    assert code == 2 and message in err and err.startswith("error:")
    assert not out.exists()


def test_cli_missing_checkpoint_and_existing_out(trained, tmp_path, capsys):
    code, err = _cli(["--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")],
                     capsys)
    assert code == 2 and "does not exist" in err

    code, err = _cli(["--model", trained.workdir, "--output_dir", trained.dirs["mid"]], capsys)
    assert code == 2 and f"--output_dir {trained.dirs['mid']!r} already exists; pass " \
        "--overwrite" in err

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, err = _cli(["--model", trained.workdir, "--output_dir", str(precious), "--overwrite"],
                     capsys)
    assert code == 2 and "refusing to delete" in err and (precious / "notes.txt").exists()

    code, err = _cli(["--model", trained.workdir, "--output_dir", trained.workdir,
                      "--overwrite"], capsys)
    assert code == 2 and "training run" in err

    # A previous export is replaced with --overwrite, here by the CLI at another size, with
    # the warning printed as one line, and every flag under its old name (still accepted).
    code, err = _cli(["--checkpoint", trained.workdir, "--out", trained.dirs["mid"], "--layers",
                      "2", "--rank", "16", "--dim", "32", "--dtype", "fp32", "--overwrite",
                      "--tokenizer", TOKENIZER], capsys)
    assert code == 0 and err.startswith("warning: exporting anyway: --exit 2: exit=2 is not "
                                        "one of the model's MLL exits")


def test_sources_when_the_prepared_data_is_elsewhere(trained, tmp_path):
    """Exporting on a machine without the run's prepared data: the tokenizer must be given,
    and the manifest comes from the run's manifest file when that is at hand."""
    from mlembed_jax.export.errors import ExportError
    from mlembed_jax.export.training_sources import training_sources

    config = trained.config.copy_and_resolve_references()
    config.data.prepared_dir = str(tmp_path / "gone")
    with pytest.raises(ExportError, match="pass --tokenizer DIR"):
        training_sources(config)
    sources = training_sources(config, TOKENIZER)
    assert sources.manifest["cldr_calendar"].query_prefix == "calendar: "
    assert (sources.eos_token_id, sources.max_seq_length) == (1, MAX_LEN)
