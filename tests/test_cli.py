"""One command-line vocabulary (mlembed_jax/cli.py) across the tools that load a model:
every --help shows the shared flags, every parser's defaults are the settings dataclasses'
defaults, the old spellings parse to the same settings as the new ones, and the commands a
finished run prints parse with the tools they name."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest
from tool_helpers import load_tool

from mlembed_jax import cli, encode, run_summary
from mlembed_jax.embedding import DEFAULT_BATCH_TOKENS
from mlembed_jax.encode import EncodeSettings, ModelSettings

TOOLS = ("encode", "eval_retrieval", "mine_negatives", "export_hf", "matryoshka_report")
ENCODING = ("encode", "eval_retrieval", "mine_negatives", "matryoshka_report")  # embed texts
POINT = ("encode", "eval_retrieval", "mine_negatives", "export_hf")  # take --rank/--exit/--dim
# The smallest argument list each parser accepts (paths need not exist to parse).
REQUIRED = {"encode": ["--model=m", "--input=t.txt", "--output=e.npy"],
            "eval_retrieval": ["--model=m"],
            "mine_negatives": ["--model=m", "--input=p.parquet", "--output_dir=o"],
            "export_hf": ["--model=m", "--output_dir=o"],
            "matryoshka_report": ["--model=m", "--output_dir=o"]}


def _module(name):
    return encode if name == "encode" else load_tool(name)


def _flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps help text at the terminal width


@pytest.mark.parametrize("name", TOOLS)
def test_help_works_and_shows_the_shared_flags(name, capsys):
    with pytest.raises(SystemExit) as e:
        _module(name).main(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    flags = ["--model", "--tokenizer_dir"]
    if name in ENCODING:
        flags += ["--max_seq_length", "--compute_dtype", "--batch_tokens", "--quiet",
                  "--allow_untrained"]
    if name in POINT:
        flags += ["--rank", "--exit", "--dim"]
    flags.append("--output_dir" if name in ("mine_negatives", "export_hf",
                                            "matryoshka_report") else "--output")
    missing = [f for f in flags if not re.search(rf"{f}\b", shown)]
    assert not missing, f"{name} --help lacks {missing}:\n{shown}"


@pytest.mark.parametrize("name", TOOLS)
def test_parser_defaults_are_the_settings_defaults(name):
    p = _module(name).parser()
    owner = {"tokenizer_dir": ModelSettings, "max_seq_length": ModelSettings,
             "compute_dtype": ModelSettings, "batch_tokens": EncodeSettings,
             "rank": EncodeSettings, "exit": EncodeSettings, "dim": EncodeSettings,
             "allow_untrained": EncodeSettings}
    dests = {a.dest for a in p._actions}
    for dest, cls in owner.items():
        if dest in dests:
            assert p.get_default(dest) == cli.field_default(cls, dest), (name, dest)
    if name in ENCODING:
        assert p.get_default("quiet") is (not EncodeSettings().progress)
        a = p.parse_args(REQUIRED[name])
        assert cli.model_settings(a) == ModelSettings("m")
        assert cli.encode_settings(a) == EncodeSettings()
    # The one default every embedding path shares (embedding.py), not a number per parser.
    assert EncodeSettings().batch_tokens == DEFAULT_BATCH_TOKENS


def test_miner_defaults_are_the_mining_dataclasses_defaults():
    from mlembed_jax.mining import MiningJob, MiningSettings

    tool = load_tool("mine_negatives")
    job, rules = tool.settings(tool.parser().parse_args(REQUIRED["mine_negatives"]))
    assert rules == MiningSettings()
    assert job == MiningJob(inputs=["p.parquet"], output_dir="o")
    # and every flag reaches its field: non-default values come through unchanged
    job, rules = tool.settings(tool.parser().parse_args(
        REQUIRED["mine_negatives"] + ["--negatives=3", "--depth=9", "--margin=0.1",
                                      "--max_score_ratio=none", "--rank_min=1",
                                      "--rank_max=8", "--sampling=random", "--seed=4",
                                      "--if_short=shrink", "--min_negatives=2",
                                      "--corpus", "c.txt", "--corpus_field=body",
                                      "--query_prefix=q: ", "--document_prefix=d: ",
                                      "--manifest=m.json", "--cache_dir=cache",
                                      "--summary=s.json", "--overwrite"]))
    assert rules == MiningSettings(negatives=3, depth=9, max_score_ratio=None, margin=0.1,
                                   rank_min=1, rank_max=8, sampling="random", seed=4,
                                   if_short="shrink", min_negatives=2)
    assert job == MiningJob(inputs=["p.parquet"], output_dir="o", corpus_files=["c.txt"],
                            corpus_field="body", query_prefix="q: ", document_prefix="d: ",
                            manifest="m.json", cache_dir="cache", summary_path="s.json",
                            overwrite=True)


def test_export_old_flag_names_are_aliases():
    p = load_tool("export_hf").parser()
    new = p.parse_args(["--model", "w", "--output_dir", "o", "--exit", "2",
                        "--tokenizer_dir", "t"])
    old = p.parse_args(["--checkpoint", "w", "--out", "o", "--layers", "2", "--tokenizer", "t"])
    assert vars(old) == vars(new)
    assert (new.model, new.output_dir, new.exit, new.tokenizer_dir) == ("w", "o", 2, "t")
    shown = _flat(p.format_help())
    for old_name in ("--checkpoint", "--out", "--layers", "--tokenizer"):
        assert f"{old_name} is the old name" in shown, old_name


def test_report_out_dir_is_an_alias_of_output_dir():
    p = load_tool("matryoshka_report").parser()
    assert vars(p.parse_args(["--model=m", "--out_dir=r"])) == vars(
        p.parse_args(["--model=m", "--output_dir=r"]))
    assert "--out_dir is the old name" in _flat(p.format_help())


def test_the_commands_a_finished_run_prints_parse(tmp_path):
    """final_report's next: lines, split as a shell would, parse with the tools they name and
    give the run directory as --model."""
    work = tmp_path / "my run"
    work.mkdir()
    text = run_summary.final_report(str(work), 3, 1.0, {}, {}, 0, "demo")
    commands = text.split("\nnext ", 1)[1].splitlines()[1:]
    seen = set()
    for line in commands:
        argv = shlex.split(line)
        if argv[1:3] == ["-m", "mlembed_jax.encode"]:
            name, args = "encode", argv[3:]
        else:
            name, args = argv[1].removesuffix(".py").split("/")[-1], argv[2:]
        a = _module(name).parser().parse_args(args)
        assert a.model == str(work), line
        seen.add(name)
    assert seen == {"encode", "export_hf", "matryoshka_report"}


def test_field_default_names_what_is_missing():
    assert cli.field_default(EncodeSettings, "exit") is None
    with pytest.raises(ValueError, match="ModelSettings.path has no default"):
        cli.field_default(ModelSettings, "path")
    with pytest.raises(ValueError, match="no field 'layers'"):
        cli.field_default(EncodeSettings, "layers")
    # the dataclasses the parsers read are frozen: a default cannot drift at run time
    with pytest.raises(dataclasses.FrozenInstanceError):
        EncodeSettings().rank = 3
