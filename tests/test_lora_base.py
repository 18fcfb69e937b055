"""A LoRA base is read once: `reader.lora_base_from` gives init_params_from's params and
lora_base.source_fingerprint's value (what existing checkpoints recorded) from one read of
the safetensors tensors. Fast: a tiny HF model saved by transformers, no training."""

import collections

import jax
import numpy as np
import pytest
from hf_helpers import make_hf_qwen3

from mlembed_jax.checkpoint.lora_base import source_fingerprint
from mlembed_jax.checkpoint.reader import init_params_from, lora_base_from
from mlembed_jax.model import safetensors_io
from mlembed_jax.model.hf_import import encoder_config_from_hf, tensor_files

# 3 layers saved with an untied lm_head (an ignored tensor), a 2-layer encoder with MEL
# taken from it: layer 2 and lm_head are skipped by the import but are in the fingerprint.
SHAPES = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_qwen3(d, tied=False, causal_lm=True, max_shard_size="40KB", **SHAPES)
    return str(d)


def _enc(hf):
    return encoder_config_from_hf(hf, mel=True, mel_r_max=32, mel_r_min=8,
                                  param_dtype="float32").truncated(2)


def _counting_reads(monkeypatch) -> collections.Counter:
    """Counts SafetensorsFile.read per tensor name (the real read still runs)."""
    counts: collections.Counter = collections.Counter()
    read = safetensors_io.SafetensorsFile.read

    def counted(self, name):
        counts[name] += 1
        return read(self, name)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", counted)
    return counts


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_one_read_gives_the_params_and_the_recorded_fingerprint(hf, monkeypatch):
    names = set(tensor_files(hf))
    assert len(set(tensor_files(hf).values())) > 1  # sharded: the index is followed
    assert "lm_head.weight" in names and any(n.startswith("model.layers.2.") for n in names)
    enc = _enc(hf)
    want_fp = source_fingerprint(hf)  # the value checkpoints saved before this change hold
    want_params, _ = init_params_from(hf, enc, None)

    counts = _counting_reads(monkeypatch)
    params, fp = lora_base_from(hf, enc, None)
    assert fp == want_fp
    assert counts == {n: 1 for n in names}  # every tensor read once, skipped ones included
    got, want = _flat(params), _flat(want_params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # What a start read before: the import, then the fingerprint's own pass over the files.
    counts.clear()
    init_params_from(hf, enc, None)
    source_fingerprint(hf)
    imported = [n for n in names if not n.startswith(("lm_head", "model.layers.2."))]
    assert counts == collections.Counter(imported) + collections.Counter(names)


def test_another_base_has_another_fingerprint(hf, tmp_path):
    other = tmp_path / "other"
    make_hf_qwen3(other, tied=False, causal_lm=True, max_shard_size="40KB", seed=1, **SHAPES)
    _, fp = lora_base_from(str(other), _enc(hf), None)
    assert fp == source_fingerprint(str(other)) != source_fingerprint(hf)
