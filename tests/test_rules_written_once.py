"""Rules every entry point shares, each written in one place: the smallest MRL dim, the
shortest max_seq_length, the prompt choice and the tokenizer-not-found message
(truncate-then-EOS itself: test_data_prepare.py)."""

from __future__ import annotations

import pathlib

import pytest

from mlembed_jax.config import base_config
from mlembed_jax.data import DEMO_TOKENIZER
from mlembed_jax.data.manifest import DatasetSpec
from mlembed_jax.data.parquet_io import DataError
from mlembed_jax.data.prepare import check_max_seq_length
from mlembed_jax.data.prepared import training_text
from mlembed_jax.data.text_encoding import (
    choose_prefixes,
    encode_texts,
    load_tokenizer,
    max_seq_length_problem,
)
from mlembed_jax.recipe import MRL_MIN_DIM, mrl_dims

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mlembed_jax"


def test_the_smallest_mrl_dim_is_the_recipes_8():
    """RECIPE.md: MRL dims m in {8, 16, 32, ...} below d, and d itself."""
    assert MRL_MIN_DIM == 8 and base_config().loss.mrl_min_dim == MRL_MIN_DIM
    assert mrl_dims(64) == (64, 32, 16, 8)


def test_the_shortest_max_seq_length_is_one_rule():
    """One token and EOS is the least a text keeps; prepare and encode_texts refuse less with
    the same sentence."""
    assert max_seq_length_problem(2) is None
    problem = max_seq_length_problem(1, "--max_seq_length")
    assert problem.startswith("--max_seq_length 1 is too small")
    with pytest.raises(DataError) as err:
        check_max_seq_length(1)
    assert str(err.value) == problem
    with pytest.raises(ValueError, match="max_seq_length 1 is too small"):
        encode_texts(load_tokenizer(DEMO_TOKENIZER), ["a"], 1)


def test_prompt_choice_flag_then_manifest_then_what_the_model_knows():
    known = {"nq": {"query": "nq: ", "document": "nq doc: "},
             "default": {"query": "q: ", "document": "d: "}}
    spec = DatasetSpec(name="nq", task_type="retrieval", query_prefix="m: ",
                       document_prefix="")
    assert choose_prefixes(known, "nq") == {"query": "nq: ", "document": "nq doc: "}
    assert choose_prefixes(known, "other") == {"query": "q: ", "document": "d: "}
    assert choose_prefixes(known) == {"query": "q: ", "document": "d: "}
    assert choose_prefixes(known, "nq", spec) == {"query": "m: ", "document": ""}
    # An explicit "" is a choice (no prefix), not "unset".
    assert choose_prefixes(known, "nq", spec, query="", document="x ") == {
        "query": "", "document": "x "}
    only = {"nq": {"query": "nq: ", "document": ""}}
    assert choose_prefixes(only, "other") == {"query": "nq: ", "document": ""}
    two = {"a": {"query": "a: "}, "b": {"query": "b: "}}
    assert choose_prefixes(two) == {"query": "", "document": ""}
    assert choose_prefixes({}) == {"query": "", "document": ""}


def test_tokenizer_not_found_is_one_message(tmp_path):
    """The export's refusal is TrainingText's sentence with the export's own fix, and the
    sentence is written nowhere else in the package."""
    from mlembed_jax.export.errors import ExportError
    from mlembed_jax.export.training_sources import training_sources

    config = base_config()
    config.data.prepared_dir = str(tmp_path / "gone")
    text = training_text(config)
    assert text.tokenizer_dir is None
    with pytest.raises(ExportError) as err:
        training_sources(config)
    assert str(err.value) == text.tokenizer_not_found("pass --tokenizer DIR pointing at it")
    assert f"prepared data {str(tmp_path / 'gone')!r} is not here" in str(err.value)
    written = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
               if "cannot find the tokenizer" in p.read_text(encoding="utf-8")]
    assert written == ["data/prepared.py"]
