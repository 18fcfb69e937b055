"""The package works as installed from its wheel, away from the repository checkout: the wheel
is built from this tree, installed into a fresh virtual environment (its dependencies come
from the test environment's site-packages, so no network is needed), and from an unrelated
directory, with PYTHONPATH unset, the demo config trains a few steps and the trained
checkpoint encodes texts. This is what breaks when library code looks for files beside the
package (configs/, tools/, the checkout root) instead of in it."""

import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{args[:4]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n" \
                              f"{r.stderr[-3000:]}"
    return r


def test_wheel_installed_outside_the_checkout_trains_the_demo_and_encodes(tmp_path):
    # The wheel is built offline with this environment's setuptools (the build backend).
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools "
                        "in the test environment: pip install setuptools")
    # What the wheel is built from: the project's metadata and the package, nothing else.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "mlembed_jax"), src / "mlembed_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(dist), str(src)])
    (wheel,) = [p for p in os.listdir(dist) if p.endswith(".whl")]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env={"PATH": os.environ["PATH"]}).stdout.strip()
    # The dependencies: the test environment's site-packages, appended after the new
    # environment's own (a plain path line: its editable-install hook is not run there).
    with open(os.path.join(site, "test-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(dist / wheel)])

    user = tmp_path / "elsewhere"
    user.mkdir()
    shutil.copy(os.path.join(ROOT, "configs", "demo.py"), user / "demo.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    where = _run([py, "-c", "import mlembed_jax; print(mlembed_jax.__file__)"], cwd=user,
                 env=env).stdout.strip()
    assert where.startswith(site), where  # the installed copy, not the checkout

    # The demo's training (make demo's command), cut to a few steps and one row bucket.
    _run([py, "-m", "mlembed_jax.train", "--config=demo.py", "--workdir=run",
          "--config.train.max_steps=3", "--config.train.validation_every=0",
          "--config.eval.retrieval_every=0", "--config.data.num_shapes=1",
          "--config.data.prefetch=0", "--config.mesh.num_devices=1"], cwd=user, env=env)
    (user / "texts.txt").write_text("Zürich\nМосква\n東京\n", encoding="utf-8")
    _run([py, "-m", "mlembed_jax.encode", "--model=run", "--input=texts.txt",
          "--output=emb.npy", "--dim=32"], cwd=user, env=env)
    emb = np.load(user / "emb.npy")
    assert emb.shape == (3, 32) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
