"""The training loop's parts: the `due` schedule, the renamed evaluation settings, and a bad
eval.* setting failing before anything compiles."""

import subprocess
import sys

import pytest
from train_helpers import DEMO, subprocess_env

from mlembed_jax.config import ConfigError, apply_overrides, base_config, load_config_file
from mlembed_jax.train import due


def test_due_multiples_and_the_last_step():
    # every 3 over 10 steps: 3, 6, 9 and the last (10), by hand.
    assert [s for s in range(1, 11) if due(s, 3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 5) if due(s, 1, 4)] == [1, 2, 3, 4]
    assert [s for s in range(1, 6) if due(s, 10, 5)] == [5]  # every > total: the last only


def test_due_every_zero_or_negative_is_never():
    for every in (0, -1):
        assert [s for s in range(0, 11) if due(s, every, 10)] == []


@pytest.mark.parametrize("old,new", [("train.eval_every", "train.validation_every"),
                                     ("eval.every", "eval.retrieval_every")])
def test_old_setting_names_name_the_new_ones(old, new, tmp_path):
    with pytest.raises(ConfigError, match=f"^{old} was renamed to {new}: set that instead$"):
        apply_overrides(base_config(), {old: "5"})
    section, leaf = old.split(".")
    path = tmp_path / "old.py"  # a config file written before the rename
    path.write_text("from mlembed_jax.config import base_config\n\n"
                    "def get_config():\n    c = base_config()\n"
                    f"    c.{section}.{leaf} = 5\n    return c\n")
    with pytest.raises(ConfigError, match=f"^{old} was renamed to {new}"):
        load_config_file(str(path))


def _train_cli(workdir, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlembed_jax.train", f"--config={DEMO}",
                           f"--workdir={workdir}", *overrides], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration  # starts a subprocess
def test_old_name_on_the_command_line_exits_2(tmp_path):
    out = _train_cli(tmp_path / "w", "--config.train.eval_every=5")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("error: train.eval_every was renamed to "
                                  "train.validation_every: set that instead")


@pytest.mark.integration  # starts a subprocess
def test_bad_beir_dir_fails_before_the_step_is_built(tmp_path):
    """The demo with a missing eval.beir_dir: one error line, printed after the data plan
    and before the model is built or anything compiled (a real run would compile for minutes
    first otherwise)."""
    missing = tmp_path / "no_such_beir"
    out = _train_cli(tmp_path / "w", f"--config.eval.beir_dir={missing}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == f"error: eval: BEIR directory '{missing}' does not exist"
    assert "data plan" in out.stdout  # the config and the data plan were checked first
    # The lines of building the step ("model: N parameters"), the state and the compile.
    built = [line for line in out.stdout.splitlines()
             if " parameters (" in line or line.startswith(("initialised", "compiled "))]
    assert not built, built
