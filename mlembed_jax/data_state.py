"""The data iterator's state as an Orbax checkpoint item, one JSON file per process.

Each process feeds different packs, so each saves its own state; grain's checkpoint handler
writes `process_<i>-of-<n>.json`. The box holds a snapshot taken at save time, so an async
save never sees a later position of the iterator.
"""

from __future__ import annotations

import json


class DataStateBox:
    """A JSON-able dict with the get_state/set_state/start_prefetch grain's handler calls."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        """Grain calls this after a restore; a snapshot has nothing to prefetch."""
        return None
