"""storage's durable writers for tables and arrays: what they write reads back with pyarrow and
numpy themselves, and a write stopped midway by a real fault (the file size limit,
RLIMIT_FSIZE) raises, keeps the previous file whole and leaves no temporary file behind."""

import contextlib
import os
import resource
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlembed_jax import storage


@contextlib.contextmanager
def file_size_limit(max_bytes):
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_npy_round_trips_and_a_short_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "a.npy")
    small = np.arange(10, dtype=np.int64)
    storage.save_npy_atomic(small, path)
    np.testing.assert_array_equal(np.load(path), small)
    big = np.arange(100_000, dtype=np.int64)  # 800 kB, far over the 64 kB limit below
    with file_size_limit(64 * 1024), pytest.raises(OSError):
        storage.save_npy_atomic(big, path)
    np.testing.assert_array_equal(np.load(path), small)
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]


def test_table_round_trips_and_a_short_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "t.parquet")
    small = pa.table({"doc_id": pa.array([3, 1, 2], pa.int64())})
    storage.write_table_atomic(small, path)
    assert pq.read_table(path).equals(small)
    # Random values: parquet's encodings cannot shrink them under the limit.
    big = pa.table({"x": np.random.default_rng(0).random(200_000)})
    with file_size_limit(64 * 1024), pytest.raises(OSError):
        storage.write_table_atomic(big, path)
    assert pq.read_table(path).equals(small)
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]
