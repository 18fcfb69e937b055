"""Command-line pieces shared by training and the tools, so that bad input is one line.

`config_from_argv` reads `--config=FILE` and `--config.section.field=value` before absl
parses the rest: a missing file or an unknown field is a ConfigError, not the traceback
ml_collections' config_flags raises when the config is first used.

    config, argv = config_from_argv(sys.argv)    # argv: what is left for absl

`writable_dir` / `writable_file` check an output location up front, before any work.
"""

from __future__ import annotations

import os

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
    import sys

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
