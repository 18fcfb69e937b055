"""LoRA through `python -m mlembed_jax.train`, the checkpoint reader and the export: the base
comes from train.init_from, the checkpoints hold the adapters plus the base's fingerprint, a
resume or a read with another base is refused, the tools read the merged model, and the
merged export equals base + adapter loaded by peft itself."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from train_helpers import final_params, small_config, train_losses

from mlembed_jax.checkpoint.lora_base import source_fingerprint
from mlembed_jax.checkpoint.reader import CheckpointError, TrainedParams, load_trained
from mlembed_jax.config import ConfigError
from mlembed_jax.model import lora
from mlembed_jax.train import run

pytestmark = pytest.mark.integration  # trains

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0}


def _train(workdir, steps, seed=0, **kw):
    assert run(small_config(**{"train.max_steps": steps, "train.seed": seed, **kw}),
               str(workdir)) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step base runs (seeds 0 and 1) and a 4-step LoRA run on the first."""
    root = tmp_path_factory.mktemp("lora_run")
    evals = {"train.validation_every": 2, "eval.retrieval_every": 2, "eval.heldout": True}
    _train(root / "base", 2, **evals)
    _train(root / "other", 2, seed=1)
    # lr 1e-3 from step 1, so 4 steps move B well past the fp32 tolerance of the tests.
    _train(root / "lora", 4, **LORA, **evals, **{"train.init_from": str(root / "base"),
                                                 "train.checkpoint_every": 2,
                                                 "optim.warmup_steps": 0, "optim.lr": 1e-3})
    return root


def _integrity(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")) as f:
        return json.load(f)


def test_lora_needs_init_from(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.rank > 0 needs train.init_from"):
        run(small_config(**LORA, **{"train.max_steps": 1}), str(tmp_path / "w"))


def test_evaluators_see_the_base_then_the_adapted_model(runs):
    """Validation (adapted forward, base as the step's argument) and retrieval (merged
    weights) run in a LoRA run; at step 0 (B = 0) validation scores the base exactly as the
    base run scored its own final params."""
    from mlembed_jax.metrics_log import read_metrics

    def rows(name):  # a step's rows (train, val, eval) merged
        out: dict = {}
        for m in read_metrics(str(runs / name)):
            out.setdefault(m["step"], {}).update(m)
        return out

    base, tuned = rows("base"), rows("lora")
    assert abs(tuned[0]["val/total"] - base[2]["val/total"]) <= 1e-5 * base[2]["val/total"]
    assert tuned[4]["val/total"] != tuned[0]["val/total"]
    for step in (2, 4):
        assert "val/total" in tuned[step]
        ndcg = [v for k, v in tuned[step].items() if k.startswith("eval/") and "ndcg@10" in k]
        assert ndcg and all(np.isfinite(ndcg)), tuned[step]


def test_sharded_lora_run_matches_one_device(runs, tmp_path):
    """The base placed by FSDP and tensor sharding on 8 devices, or over two slices, the
    adapters sharded like the weights they adapt: the same losses as on one device (1e-4,
    test_train's bound)."""
    common = {**LORA, "train.init_from": str(runs / "base"), "data.packs_per_step": 4,
              "train.checkpoint_every": 100, "optim.warmup_steps": 0, "optim.lr": 1e-3}
    _train(tmp_path / "one", 4, **common, **{"mesh.num_devices": 1})
    _train(tmp_path / "eight", 4, **common, **{"mesh.data": 2, "mesh.fsdp": 2,
                                               "mesh.tensor": 2})
    # Two slices of 4 (tests/test_multislice.py's stand-in): data across, FSDP x tensor
    # inside.
    _train(tmp_path / "slices", 4, **common, **{"mesh.data": 1, "mesh.fsdp": 2,
                                                "mesh.tensor": 2, "mesh.dcn_data": 2})
    a = train_losses(tmp_path / "one")
    assert sorted(a) == [1, 2, 3, 4]
    assert a[4] != a[1]  # the adapters trained
    for other in ("eight", "slices"):
        b = train_losses(tmp_path / other)
        assert sorted(b) == sorted(a), other
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4, (other, step, a[step], b[step])


def test_checkpoint_holds_adapters_and_the_base_fingerprint(runs):
    step, params = final_params(runs / "lora")
    assert step == 4
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert {p[-1].key for p, _ in leaves} == {"A", "B"}  # no base weight saved
    assert len(leaves) == 2 * len(lora.TARGETS)
    rec = _integrity(runs / "lora", 4)["lora_base"]
    assert rec["path"] == str(runs / "base")
    assert rec["fingerprint"] == source_fingerprint(str(runs / "base"))
    assert rec["fingerprint"] != source_fingerprint(str(runs / "other"))


def test_a_checkpoint_base_is_read_once_and_fingerprinted_as_before(runs, tmp_path,
                                                                   monkeypatch):
    """A training-checkpoint base: its fingerprint is the recorded checksums' (no param read
    for it); of a checkpoint saved without them (integrity item removed, as older saves
    were), the figures of the one read the import makes, equal to the recorded ones."""
    from mlembed_jax.checkpoint.reader import lora_base_from
    from mlembed_jax.model.qwen3 import EncoderConfig

    config, _, step = load_trained(str(runs / "base"))
    enc = EncoderConfig.from_config(config.model)
    recorded = source_fingerprint(str(runs / "base"))
    old = shutil.copytree(runs / "base", tmp_path / "base")
    shutil.rmtree(old / "checkpoints" / str(step) / "integrity")
    reads: list = []
    read = TrainedParams._read_saved
    monkeypatch.setattr(TrainedParams, "_read_saved",
                        lambda self, p: reads.append(p) or read(self, p))
    for path in (runs / "base", old):
        reads.clear()
        params, fp = lora_base_from(str(path), enc, config)
        assert fp == recorded
        assert sorted(reads) == sorted(set(reads))  # each param read once
        assert len(reads) == len(jax.tree_util.tree_leaves(params))


def test_reader_merges_the_adapters_into_the_base(runs):
    config, merged, step = load_trained(str(runs / "lora"))
    _, base, _ = load_trained(str(runs / "base"))
    reader = TrainedParams(str(runs / "lora"))
    lcfg = lora.LoraConfig.from_config(config.model)
    want = jax.device_get(lora.merge_adapters(base, reader.read_adapters(), lcfg))
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    for (path, got), w in zip(jax.tree_util.tree_leaves_with_path(merged),
                              jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-6, err_msg=str(path))
    # The adapters moved the adapted kernels; the embedding and norms are the base's.
    q = ("layers", "self_attn", "q_proj")
    assert not np.array_equal(reader.read(q), base["layers"]["self_attn"]["q_proj"])
    np.testing.assert_array_equal(merged["embed_tokens"]["U"], base["embed_tokens"]["U"])
    reader.merge = False  # the base as it is (what a PEFT export writes beside the adapters)
    np.testing.assert_array_equal(reader.read(q), base["layers"]["self_attn"]["q_proj"])


def test_hf_directory_base(tmp_path):
    """A base from a Hugging Face directory (imported, MEL factors by SVD): fingerprinted
    from its safetensors tensors, so a re-saved model with other weights is another base."""
    from hf_helpers import make_hf_qwen3

    shapes = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    hf = tmp_path / "hf"
    make_hf_qwen3(hf, **shapes)
    _train(tmp_path / "lora", 1, **LORA, **{"train.init_from": str(hf)})
    rec = _integrity(tmp_path / "lora", 1)["lora_base"]
    assert rec == {"path": str(hf), "fingerprint": source_fingerprint(str(hf))}
    config, merged, _ = load_trained(str(tmp_path / "lora"))
    assert merged["layers"]["mlp"]["up_proj"].shape == (2, 64, 128)
    make_hf_qwen3(hf, seed=1, **shapes)  # same shapes, other weights, same path
    assert source_fingerprint(str(hf)) != rec["fingerprint"]
    with pytest.raises(CheckpointError, match="changed since training"):
        load_trained(str(tmp_path / "lora"))
    # Another shape no longer imports; the error still says the base changed.
    shutil.rmtree(hf)
    make_hf_qwen3(hf, **{**shapes, "intermediate_size": 96})
    with pytest.raises(CheckpointError, match="changed since training") as e:
        load_trained(str(tmp_path / "lora"))
    assert source_fingerprint(str(hf)) in str(e.value) and "\n" not in str(e.value)


def test_resume_on_another_base_is_refused(runs, tmp_path):
    work = shutil.copytree(runs / "lora", tmp_path / "lora")
    cfg = small_config(**LORA, **{"train.max_steps": 6, "train.init_from": str(runs / "other")})
    with pytest.raises(CheckpointError) as e:
        run(cfg, str(work))
    msg = str(e.value)
    fp = source_fingerprint(str(runs / "other"))
    assert str(runs / "base") in msg and str(runs / "other") in msg and fp in msg, msg
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="holds LoRA adapters, but this run has LoRA off"):
        run(small_config(**{"train.max_steps": 6}), str(work))


def test_reader_refuses_a_base_that_changed(runs, tmp_path):
    """A LoRA run on a copy of the base; the copy is then replaced by another run: the
    tools refuse the adapters, naming both fingerprints."""
    base = shutil.copytree(runs / "base", tmp_path / "base")
    _train(tmp_path / "lora", 1, **LORA, **{"train.init_from": str(base)})
    before = source_fingerprint(str(base))
    shutil.rmtree(base)
    shutil.copytree(runs / "other", base)
    with pytest.raises(CheckpointError, match="changed since training") as e:
        load_trained(str(tmp_path / "lora"))
    assert before in str(e.value) and source_fingerprint(str(base)) in str(e.value)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_trained(str(tmp_path / "lora"))


# ------------------------------------------------------------------------------------------
# Export: merged, and as a peft adapter beside the base, checked against peft's own loading.

TEXTS = ["der Montag", "jeudi", "an unrelated sentence about cats", "日曜日"]
TOL = 1e-5  # fp32, the bound for merged vs adapted


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_numpy=True)


def _peft_last_token(base_dir, adapter_dir, tokenizer_dir):
    """peft.PeftModel over transformers' Qwen3Model, fp32: the normalised last-token state of
    each text, one text per forward (no padding), tokenised as the export's tokenizer does."""
    import peft
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = peft.PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(base_dir), dtype=torch.float32), str(adapter_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            out.append(model(input_ids=ids).last_hidden_state[0, -1].numpy())
    out = np.stack(out)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def exports(runs):
    from mlembed_jax.export import export_checkpoint

    out = runs / "exports"
    export_checkpoint(str(runs / "lora"), str(out / "merged"), dtype="fp32")
    summary = export_checkpoint(str(runs / "lora"), str(out / "peft"), dtype="fp32", peft=True)
    export_checkpoint(str(runs / "base"), str(out / "base"), dtype="fp32")
    return out, summary


def test_peft_export_writes_peft_names_and_config(exports):
    import safetensors.numpy

    out, summary = exports
    assert "adapter/adapter_model.safetensors" in summary["files"]
    with open(out / "peft" / "adapter" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["lora_dropout"] == 0.0
    assert cfg["base_model_name_or_path"] == str(out / "peft" / "base")
    tensors = safetensors.numpy.load_file(str(out / "peft" / "adapter" /
                                              "adapter_model.safetensors"))
    # peft's names and Linear layouts, as peft.save_pretrained writes them for Qwen3Model.
    a = tensors["base_model.model.layers.1.self_attn.o_proj.lora_A.weight"]
    b = tensors["base_model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)  # [r, heads * head_dim], [hidden, r]
    assert len(tensors) == 2 * 2 * len(lora.TARGETS)  # A and B, 2 layers
    # The model cards say what the weights are: the bare base, or merged.
    assert "without the LoRA adapters" in (out / "peft" / "base" / "README.md").read_text()
    assert "merged into these weights" in (out / "merged" / "README.md").read_text()


def test_merged_export_equals_base_plus_peft_adapter(exports):
    out, _ = exports
    merged = _st(out / "merged")
    via_peft = _peft_last_token(out / "peft" / "base", out / "peft" / "adapter", out / "merged")
    assert np.abs(merged - via_peft).max() <= TOL  # measured 3e-7
    # sentence-transformers loads the adapter directory as base + adapter itself.
    assert np.abs(_st(out / "peft" / "adapter") - merged).max() <= TOL
    # The peft export's base is the base run's own export, and LoRA changed the embeddings
    # (Qwen3-Embedding#167: "the trained LoRA gives the same results as the base").
    base = _st(out / "base")
    np.testing.assert_allclose(_st(out / "peft" / "base"), base, atol=1e-6)
    assert np.abs(merged - base).max() > 100 * TOL  # measured 6e-3


def test_peft_export_of_a_full_model_is_refused(runs, tmp_path):
    from mlembed_jax.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="--peft needs a LoRA checkpoint"):
        export_checkpoint(str(runs / "base"), str(tmp_path / "x"), peft=True)
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------------------
# A demo-scale LoRA run end to end: SIGTERM and exact resume, encode, both exports.

def test_demo_lora_run_resumes_exactly_and_exports(runs, exports, tmp_path):
    import subprocess
    import sys

    from train_helpers import run_cli, sigterm_then_resume_matches, subprocess_env

    steps = 12
    kw = {**LORA, "model.lora.rank": 8, "train.init_from": str(runs / "base"),
          "train.max_steps": steps, "train.checkpoint_every": 1000, "optim.warmup_steps": 0,
          "optim.lr": 1e-3}
    straight = run_cli(tmp_path / "straight", **kw)
    assert straight.returncode == 0, straight.stderr[-2000:]

    work = tmp_path / "killed"
    sigterm_then_resume_matches(tmp_path / "straight", work, steps, **kw)

    # Both exports through the command line; both load in sentence-transformers alike.
    tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "export_hf.py")
    for name, extra in (("merged", []), ("peft", ["--peft"])):
        p = subprocess.run([sys.executable, tool, f"--model={work}",
                            f"--output_dir={tmp_path / name}", "--dtype=fp32", *extra],
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    merged = _st(tmp_path / "merged")
    assert np.abs(_st(tmp_path / "peft" / "adapter") - merged).max() <= TOL
    assert np.abs(_st(exports[0] / "base") - merged).max() > 100 * TOL

    # encode reads the LoRA workdir as the merged model.
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    p = subprocess.run([sys.executable, "-m", "mlembed_jax.encode", f"--model={work}",
                        f"--input={texts}", f"--output={tmp_path / 'emb.npy'}"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    emb = np.load(tmp_path / "emb.npy")
    assert np.abs(emb - merged).max() <= 1e-4  # measured 2e-7


def test_aot_compile_takes_the_base_as_an_argument():
    """tools/aot_compile.py lowers the LoRA step with the frozen base beside the state: the
    compiled program's arguments hold both (8 fake CPU devices, FSDP over all of them)."""
    import re
    import subprocess
    import sys

    from train_helpers import DEMO, ROOT, SMALL

    args = [sys.executable, os.path.join(ROOT, "tools", "aot_compile.py"), f"--config={DEMO}",
            "--topology=cpu:8"]
    for k, v in {**SMALL, **LORA, "mesh.fsdp": 8, "mesh.data": 1}.items():
        args.append(f"--config.{k}={v}")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^LoRA: rank 4 on q_proj,.*: [\d,]+ trained params", r.stdout, re.M)
    m = re.search(r"arguments\s+([\d.]+) MB\s+\(train state ([\d.]+) MB \+ frozen LoRA base "
                  r"([\d.]+) MB \+ batch", r.stdout)
    assert m, r.stdout
    args_mb, state_mb, base_mb = map(float, m.groups())
    assert base_mb > state_mb and args_mb >= state_mb + base_mb - 0.01
