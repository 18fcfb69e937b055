"""Every way a user's HF directory can be wrong gets one clear error."""

import json
import os
import shutil

import pytest
from hf_helpers import make_hf_qwen3
from tool_helpers import load_tool

from mlembed_jax.model.hf_import import (
    CheckpointError,
    encoder_config_from_hf,
    load_hf_params,
    summarize,
)
from mlembed_jax.model.safetensors_io import SafetensorsFile, write_safetensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_qwen3(d)
    return d


def _copy(hf_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(hf_dir, out)
    return out


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        encoder_config_from_hf("/nonexistent/model")


def test_not_qwen3(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'llama'.*Qwen3 models only"):
        encoder_config_from_hf(str(d))


def test_missing_and_extra_tensors_reported_together(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    st = SafetensorsFile(str(d / "model.safetensors"))
    tensors = {n: st.read(n) for n in st.names()}
    del st
    tensors.pop("layers.3.mlp.up_proj.weight")
    tensors.pop("norm.weight")
    tensors["layers.1.self_attn.bogus.weight"] = tensors["layers.1.mlp.up_proj.weight"]
    tensors["layers.2.mlp.down_proj.weight"] = tensors["layers.2.mlp.down_proj.weight"][:, :5]
    write_safetensors(str(d / "model.safetensors"), tensors)
    cfg = encoder_config_from_hf(str(d))
    with pytest.raises(CheckpointError) as e:
        load_hf_params(str(d), cfg)
    msg = str(e.value)
    for part in ("layers.3.mlp.up_proj.weight", "norm.weight", "layers.1.self_attn.bogus.weight",
                 "layers.2.mlp.down_proj.weight: shape [64, 5], expected [64, 96]"):
        assert part in msg, msg


def test_pickle_only_checkpoint_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    cfg = encoder_config_from_hf(str(d))
    with pytest.raises(CheckpointError, match="pickle.*safe_serialization=True"):
        load_hf_params(str(d), cfg)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = encoder_config_from_hf(str(d))
    with pytest.raises(Exception, match="truncated"):
        load_hf_params(str(d), cfg)


def test_checkpoint_of_another_shape(hf_dir):
    import dataclasses

    cfg = dataclasses.replace(encoder_config_from_hf(str(hf_dir)), hidden_size=128)
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64, config 128"):
        load_hf_params(str(hf_dir), cfg)


def test_summary_counts_parameters(hf_dir):
    s = summarize(str(hf_dir))
    # Tiny fixture: embed 160x64 + 5 layers x (q 64x64 + k,v 2x 32x64 + o 64x64 + norms
    # 2x16 + 2x64 + MLP 3x 64x96) + final norm 64.
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 16 + 2 * 64 + 3 * 64 * 96
    assert s.total_params == 160 * 64 + 5 * per_layer + 64
    assert s.embedding_params == 160 * 64


def test_inspect_tool_prints_counts(hf_dir, capsys):
    mod = load_tool("inspect_hf")
    assert mod.main([str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert "embedding parameters: 10,240" in out  # 160 x 64
    assert mod.main(["/nonexistent"]) == 2
