"""The checkpoint package's read side is safe to import: the tools read checkpoints without
changing how the process logs. Each check runs in a fresh interpreter, since this test
process has long since imported the training side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Third-party imports first, so that what they install on import is in the baseline; then
# the project's modules, whose additions the snapshot would show.
_PROBE = r"""
import json, logging, sys
import absl.logging, grain.python, jax, orbax.checkpoint, tensorstore  # noqa: F401

def snapshot():
    names = ["", "absl", "orbax", "asyncio", "jax"]
    out = {n or "root": [[type(f).__name__ for f in logging.getLogger(n).filters],
                         [type(h).__name__ for h in logging.getLogger(n).handlers]]
           for n in names}
    out["unraisablehook_default"] = sys.unraisablehook is sys.__unraisablehook__
    return out

before = snapshot()
sys.path.insert(0, sys.argv[1])
from tool_helpers import load_tool
import mlembed_jax.checkpoint.reader, mlembed_jax.encode, mlembed_jax.export  # noqa: F401
for name in ("export_hf", "eval_retrieval", "matryoshka_report", "mine_negatives"):
    load_tool(name)
after = snapshot()
manager_imported = "mlembed_jax.checkpoint.manager" in sys.modules
# The control: reading a checkpoint does install the asyncio filter, and the snapshot sees it.
mlembed_jax.checkpoint.orbax_logs.quiet_task_noise()
print(json.dumps({"before": before, "after": after, "manager": manager_imported,
                  "after_use": snapshot()}))
"""


def test_importing_the_reader_and_the_tools_installs_no_logging_filter_or_hook():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PROBE, TESTS], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["after"] == got["before"]
    assert got["after"]["unraisablehook_default"] is True
    assert got["manager"] is False  # the tools never load the training side
    assert got["after_use"]["asyncio"][0] == ["_TensorStoreTaskNoise"]  # the probe can fail
