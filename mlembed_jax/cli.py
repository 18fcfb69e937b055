"""Command-line pieces shared by training and the tools, so that bad input is one line.

`config_from_argv` reads `--config=FILE` and `--config.section.field=value` before absl
parses the rest: a missing file or an unknown field is a ConfigError, not the traceback
ml_collections' config_flags raises when the config is first used.

    config, argv = config_from_argv(sys.argv)    # argv: what is left for absl

`writable_dir` / `writable_file` check an output location up front, before any work.

The tools' flags are declared here once (encode, eval_retrieval, mine_negatives, export_hf,
matryoshka_report), with one spelling each: `--model` names what is read (a training
workdir, one of its checkpoints, or an HF / exported directory), `--output` a file written
and `--output_dir` a directory written; older spellings stay accepted as aliases.

    add_model_flags(parser); add_point_flags(parser); add_output_flag(parser, directory=True)
    args = parser.parse_args(argv)
    model = model_settings(args).load()           # encode.ModelSettings
    point = encode_settings(args)                 # encode.EncodeSettings

Defaults come from those dataclasses (`field_default`), never retyped in a parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from mlembed_jax import storage
from mlembed_jax.config import ConfigError, load_config_file

_PREFIX = "--config."


def split_config_args(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """(config file, {"section.field": "value"}, the other arguments, argv[0] first).

    Accepts `--config=FILE`, `--config FILE`, `--config.a.b=value` and `--config.a.b value`.
    """
    path, overrides, rest = None, {}, list(argv[:1])
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name, eq, value = arg.partition("=")
        if name == "--config" or name.startswith(_PREFIX):
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{name} needs a value: {name}=VALUE")
                i += 1
                value = args[i]
            if name == "--config":
                path = value
            else:
                key = name[len(_PREFIX):]
                if not key or key.startswith(".") or key.endswith("."):
                    raise ConfigError(f"{arg!r} is not --config.section.field=value")
                overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return path, overrides, rest


def config_from_argv(argv: list[str]):
    """(validated ConfigDict, remaining argv). ConfigError (one line) for a missing or
    unreadable --config, an unknown field or a value of the wrong type."""
    path, overrides, rest = split_config_args(argv)
    if not path:
        raise ConfigError("--config is required: a configs/*.py file, e.g. "
                          "--config=configs/demo.py")
    return load_config_file(path, overrides), rest


def run_absl_main(main) -> None:
    """A config-taking command's entry point: `main(argv, config)` under absl's app.run,
    after the config is read; a bad config is one `error:` line and exit code 2."""
    from absl import app

    try:
        config, rest = config_from_argv(sys.argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(lambda argv: main(argv, config), argv=rest)


def writable_dir(path: str, what: str) -> str:
    """Creates `path` if needed and checks a file can be written there; ConfigError naming
    `what` (e.g. "--workdir") otherwise. Returns the path. `path` may be a URL (gs://...):
    then the bucket must exist and take an object."""
    try:
        storage.writable_dir_check(path)
    except storage.StorageError as e:
        raise ConfigError(f"{what} {e}") from None
    except OSError as e:
        raise ConfigError(f"{what} {path!r} is not writable ({e.strerror or e}); choose a "
                          "directory you can write to") from None
    return path


def writable_file(path: str, what: str) -> str:
    """`writable_dir` for the directory that will hold the file `path`."""
    writable_dir(os.path.dirname(storage.absolute(path)), f"{what} {path!r}: its directory")
    return path


def missing_dirs(path: str) -> list[str]:
    """The directories of the local `path` (itself included) that do not exist yet, deepest
    first: what an output check will create, for `remove_empty` to take back after a
    failure. [] for a URL (an object store has no directories)."""
    if storage.is_url(path):
        return []
    path, out = os.path.abspath(path), []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        out.append(path)
        path = os.path.dirname(path)
    return out


def remove_empty(dirs: list[str]) -> None:
    """Removes each of `dirs` (deepest first) that is still empty, so that a command that
    failed leaves no directory of its own behind."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:  # not empty (then neither is any parent), or already gone
            return


# --------------------------------------------------------------------------- tool flags
# encode.py imports this module (for its output checks), so the settings classes are imported
# inside the functions below, not at the top.

MODEL_HELP = ("a training workdir (its latest checkpoint), "
              "WORKDIR/checkpoints/<step>, or a Hugging Face / exported Qwen3 directory")


def field_default(cls, name: str):
    """The default of dataclass `cls`'s field `name`: what a parser offers when a flag is not
    given, so that the flag and the library cannot disagree."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def _old_names(help: str, aliases) -> str:
    if not aliases:
        return help
    names = " and ".join(aliases)
    return f"{help}; {names} {'are the old names' if len(aliases) > 1 else 'is the old name'}"


def add_model_flags(p: argparse.ArgumentParser, *, help: str = MODEL_HELP,
                    model_aliases: tuple[str, ...] = (), tokenizer_aliases: tuple[str, ...] = (),
                    encoding: bool = True) -> None:
    """--model and --tokenizer_dir; with `encoding` also --max_seq_length, --compute_dtype,
    --batch_tokens and --quiet (what a tool that embeds texts needs)."""
    from mlembed_jax.encode import EncodeSettings, ModelSettings

    p.add_argument("--model", *model_aliases, dest="model", required=True,
                   help=_old_names(help, model_aliases))
    p.add_argument("--tokenizer_dir", *tokenizer_aliases, dest="tokenizer_dir",
                   default=field_default(ModelSettings, "tokenizer_dir"),
                   help=_old_names("tokenizer directory (default: the model's own, or the one "
                                   "its training data was prepared with)", tokenizer_aliases))
    if not encoding:
        return
    p.add_argument("--max_seq_length", type=int,
                   default=field_default(ModelSettings, "max_seq_length"),
                   help="truncation length in tokens, EOS included (default: the model's)")
    p.add_argument("--compute_dtype", choices=("float32", "bfloat16"),
                   default=field_default(ModelSettings, "compute_dtype"),
                   help="default: the model's")
    batch = field_default(EncodeSettings, "batch_tokens")
    p.add_argument("--batch_tokens", type=int, default=batch,
                   help=f"tokens per pack, one pack per device (default {batch})")
    p.add_argument("--quiet", action="store_true",
                   default=not field_default(EncodeSettings, "progress"),
                   help="no progress bars")


def add_point_flags(p: argparse.ArgumentParser, *, exit_aliases: tuple[str, ...] = (),
                    untrained: bool = True, dim_help: str = "") -> None:
    """--rank --exit --dim (the point of the three Matryoshka dimensions), and with
    `untrained` --allow_untrained."""
    from mlembed_jax.encode import EncodeSettings

    p.add_argument("--rank", type=int, default=field_default(EncodeSettings, "rank"),
                   help="MEL rank (default r_max)")
    p.add_argument("--exit", *exit_aliases, dest="exit", type=int,
                   default=field_default(EncodeSettings, "exit"),
                   help=_old_names("MLL exit: the model cut to its first K layers (default: "
                                   "all)", exit_aliases))
    p.add_argument("--dim", type=int, default=field_default(EncodeSettings, "dim"),
                   help=dim_help or "MRL dim (default: the hidden size, or an export's "
                   "truncate_dim)")
    if untrained:
        add_untrained_flag(p)


def add_untrained_flag(p: argparse.ArgumentParser) -> None:
    """--allow_untrained (part of add_point_flags; alone for tools that take grids)."""
    from mlembed_jax.encode import EncodeSettings

    p.add_argument("--allow_untrained", action="store_true",
                   default=field_default(EncodeSettings, "allow_untrained"),
                   help="allow rank/exit/dim values the model was not trained at")


def add_output_flag(p: argparse.ArgumentParser, *, directory: bool, help: str,
                    required: bool = True, aliases: tuple[str, ...] = ()) -> None:
    """--output (a file) or --output_dir (a directory); not required: default ''."""
    name = "--output_dir" if directory else "--output"
    p.add_argument(name, *aliases, dest=name[2:], required=required,
                   **({} if required else {"default": ""}), help=_old_names(help, aliases))


def model_settings(a: argparse.Namespace):
    """The encode.ModelSettings the parsed add_model_flags flags name."""
    from mlembed_jax.encode import ModelSettings

    return ModelSettings(path=a.model, tokenizer_dir=a.tokenizer_dir,
                         max_seq_length=a.max_seq_length, compute_dtype=a.compute_dtype)


def encode_settings(a: argparse.Namespace):
    """The encode.EncodeSettings of the parsed add_point_flags / add_model_flags flags; a
    flag the parser lacks (a grid tool has no --rank) keeps the dataclass default."""
    from mlembed_jax.encode import EncodeSettings

    kw = {k: getattr(a, k) for k in ("rank", "exit", "dim", "allow_untrained", "batch_tokens")
          if hasattr(a, k)}
    if hasattr(a, "quiet"):
        kw["progress"] = not a.quiet
    return EncodeSettings(**kw)


# --------------------------------------------------------------------------- evaluation sets

def add_eval_set_flags(p: argparse.ArgumentParser) -> None:
    """The evaluation set of tools/eval_retrieval.py and tools/matryoshka_report.py."""
    p.add_argument("--beir_dir", default="", help="BEIR-layout directory (local or gs://)")
    p.add_argument("--split", default="test", help="qrels/<split>.tsv")
    p.add_argument("--heldout", action="store_true",
                   help="evaluate on the checkpoint's held-out split (its retrieval datasets)")
    p.add_argument("--query_prefix", default=None, help="instruction before each query "
                   "(default: the model's 'query' prompt if it has one, else none)")
    p.add_argument("--document_prefix", default=None, help="instruction before each doc")
    p.add_argument("--max_queries", type=int, default=0, help="seeded query sample; 0 = all")
    p.add_argument("--max_corpus", type=int, default=0,
                   help="judged docs + a seeded sample of the rest; 0 = all (full corpus)")
    p.add_argument("--seed", type=int, default=0)


def load_model_and_sets(a: argparse.Namespace):
    """(encode.Encoder, [eval.retrieval.RetrievalSet]): the model (add_model_flags) and the
    tokenised evaluation set(s) (add_eval_set_flags) the parsed flags name."""
    from mlembed_jax.data.text_encoding import choose_prefixes
    from mlembed_jax.eval import retrieval as rev

    if bool(a.beir_dir) == bool(a.heldout):
        raise rev.RetrievalDataError("give exactly one of --beir_dir=DIR or --heldout")
    model = model_settings(a).load()
    if a.heldout:
        if model.train_config is None:
            raise rev.RetrievalDataError("--heldout needs a training checkpoint (its config "
                                         "names the data); an HF directory has none")
        sets = rev.heldout_sets(model.train_config)
        if a.max_queries:
            sets = [rev.cap_queries(s, a.max_queries, a.seed) for s in sets]
        return model, sets
    s = rev.load_beir(a.beir_dir, a.split, max_queries=a.max_queries, max_corpus=a.max_corpus,
                      seed=a.seed)
    note = rev.describe_load(s.info)
    if note:
        print(f"{a.beir_dir}: {note}", file=sys.stderr)
    chosen = choose_prefixes(model.prefixes, query=a.query_prefix, document=a.document_prefix)
    qp, dp = chosen["query"], chosen["document"]
    s = rev.tokenize_set(s, model.tokenize, qp, dp)
    s.info.update(query_prefix=qp, document_prefix=dp)
    return model, [s]
