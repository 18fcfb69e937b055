"""LoRA through `python -m mlembed_jax.train` and the checkpoint reader: the base comes from
train.init_from, the checkpoints hold the adapters plus the base's fingerprint, a resume
or a read with another base is refused, and the tools read the merged model."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from train_helpers import final_params, small_config

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
    _train(root / "base", 2)
    _train(root / "other", 2, seed=1)
    _train(root / "lora", 4, **LORA, **{"train.init_from": str(root / "base"),
                                        "train.checkpoint_every": 2})
    return root


def _integrity(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")) as f:
        return json.load(f)


def test_lora_needs_init_from(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.rank > 0 needs train.init_from"):
        run(small_config(**LORA, **{"train.max_steps": 1}), str(tmp_path / "w"))


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


def test_resume_on_another_base_is_refused(runs, tmp_path):
    work = shutil.copytree(runs / "lora", tmp_path / "lora")
    cfg = small_config(**LORA, **{"train.max_steps": 6, "train.init_from": str(runs / "other")})
    with pytest.raises(CheckpointError) as e:
        run(cfg, str(work))
    msg = str(e.value)
    fp = source_fingerprint(str(runs / "other"))
    assert str(runs / "base") in msg and str(runs / "other") in msg and fp in msg, msg
    assert "\n" not in msg


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
