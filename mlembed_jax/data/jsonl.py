"""Reading JSON Lines with errors that name the file and the line."""

from __future__ import annotations

import json
from typing import Iterator

from mlembed_jax import storage


def iter_jsonl(path: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, object]]:
    """Yields (line number, parsed value) for every non-blank line; a line that is not JSON
    raises `error` naming `path:line`."""
    with storage.open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                            f"{e.colno})") from None
