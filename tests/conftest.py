"""Test setup: 8 fake CPU devices, so sharded code runs for real instead of skipping.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives here. Below:
the session fixtures that several test modules share.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the whole session, this process and every subprocess a test
# starts (they inherit the environment): many tests train the same tiny configs, and the
# CLI/SIGTERM/resume tests compile the same step several times. Halves test_train's SIGTERM
# test on 2 cores (198 s -> 101 s). A fresh directory per session, so every run compiles
# each program once and no result depends on an earlier session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="mlembed-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def names_run(tmp_path_factory):
    """(workdir, config) of the small model trained on the demo's cldr_names (500 steps; see
    retrieval_helpers), trained once per session for every test that needs a trained model."""
    from retrieval_helpers import trained_names_run

    return trained_names_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A local GCS server (gcs_helpers.fake_gcs_server) for one test module: its URL, with
    the bucket gcs_helpers.BUCKET created and every client pointed at it."""
    from gcs_helpers import fake_gcs_server

    with fake_gcs_server(tmp_path_factory.mktemp("gcs")) as url:
        yield url
