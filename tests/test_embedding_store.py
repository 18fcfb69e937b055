"""embedding_store: embeddings written once and read back equal to encoding again; only new
texts are encoded; another model or point is refused; a failed write leaves a store that
still works."""

from __future__ import annotations

import glob
import os
import resource
import signal

import jax
import numpy as np
import pytest

from mlembed_jax import encode as enc
from mlembed_jax.data import DEMO_TOKENIZER
from mlembed_jax.data.text_encoding import load_tokenizer
from mlembed_jax.embedding_store import EmbeddingStore, StoreError
from mlembed_jax.model.encoder import init_params
from mlembed_jax.model.qwen3 import EncoderConfig

CFG = EncoderConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, mel=True, mel_r_max=16,
                    mel_r_min=4)
TEXTS = [f"{w} number {i}" for i, w in enumerate(["Montag", "lundi", "月曜日", "Monday",
                                                   "lunedì", "poniedziałek"] * 5)]


def _model(seed: int = 0) -> enc.Encoder:
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(seed))
    return enc.Encoder(params=params, cfg=CFG, tokenizer=load_tokenizer(DEMO_TOKENIZER),
                       max_seq_length=64)


@pytest.fixture(scope="module")
def model():
    return _model()


def _parts(path) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "part-*.keys.npy")))


def test_written_once_read_back_and_extended(model, tmp_path):
    ids = model.tokenize(TEXTS)
    want = model.encode_ids(ids, rank=8, exit=1, dim=16)
    store = EmbeddingStore(str(tmp_path), model, rank=8, exit=1, dim=16)
    np.testing.assert_allclose(store.embed(ids), want, atol=1e-6)
    assert len(store) == len(TEXTS) and len(_parts(tmp_path)) == 1
    # A new store object on the same directory reads the part: nothing is written.
    again = EmbeddingStore(str(tmp_path), model, rank=8, exit=1, dim=16)
    np.testing.assert_array_equal(again.embed(ids[::-1]), store.embed(ids)[::-1])
    assert len(_parts(tmp_path)) == 1
    # More texts: only the new ones are encoded, into one new part (duplicates once).
    more = model.tokenize(["Dienstag", "mardi", "Dienstag"]) + ids[:4]
    got = again.embed(more)
    assert len(_parts(tmp_path)) == 2 and len(again) == len(TEXTS) + 2
    assert len(np.load(_parts(tmp_path)[-1])) + len(np.load(_parts(tmp_path)[0])) == 32
    np.testing.assert_allclose(got, model.encode_ids(more, rank=8, exit=1, dim=16), atol=1e-6)
    # Small parts: a long run is written (and can be resumed) part by part.
    small = EmbeddingStore(str(tmp_path / "small"), model, rank=8, exit=1, dim=16,
                           part_size=7)
    np.testing.assert_allclose(small.embed(ids), want, atol=1e-6)
    assert len(_parts(tmp_path / "small")) == 5  # 30 texts / 7 per part
    # In memory (path None): the same answers, nothing on disk.
    np.testing.assert_allclose(EmbeddingStore(None, model, rank=8, exit=1, dim=16).embed(ids),
                               want, atol=1e-6)


def test_another_model_or_point_is_refused(model, tmp_path):
    EmbeddingStore(str(tmp_path), model, exit=1).embed(model.tokenize(TEXTS[:3]))
    with pytest.raises(StoreError, match=r"point \{'rank': 16, 'exit': 1, 'dim': 32\}, not"):
        EmbeddingStore(str(tmp_path), model, exit=2)
    with pytest.raises(StoreError, match="another model .weights"):
        EmbeddingStore(str(tmp_path), _model(seed=1), exit=1)
    with pytest.raises(enc.EncodeError, match="not one of the model's MLL exits"):
        EmbeddingStore(str(tmp_path), model, exit=3)


def test_a_write_that_fails_leaves_a_working_store(model, tmp_path):
    """A real fault: the file size limit (RLIMIT_FSIZE) stops the part's write midway."""
    ids = model.tokenize(TEXTS)
    store = EmbeddingStore(str(tmp_path), model)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, old_limit[1]))
    try:
        with pytest.raises(StoreError, match="cannot write to the embedding store"):
            store.embed(ids)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert _parts(tmp_path) == []  # no part counts as written
    fresh = EmbeddingStore(str(tmp_path), model)
    assert len(fresh) == 0
    np.testing.assert_allclose(fresh.embed(ids), model.encode_ids(ids), atol=1e-6)
    # A part whose keys file is missing (a kill between its two writes leaves that) is not
    # read; its texts are encoded again.
    os.remove(_parts(tmp_path)[0])
    orphaned = EmbeddingStore(str(tmp_path), model)
    assert len(orphaned) == 0
    np.testing.assert_allclose(orphaned.embed(ids), model.encode_ids(ids), atol=1e-6)
    assert len(_parts(tmp_path)) == 1
    # Corrupt bytes in a part's keys: one clear error naming the file and the fix.
    with open(_parts(tmp_path)[0], "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(StoreError, match=r"unreadable part .* delete"):
        EmbeddingStore(str(tmp_path), model)
