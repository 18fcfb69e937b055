"""Where metrics go: one JSON line per log step in workdir/metrics.jsonl, and TensorBoard.

A resumed run replays the steps after its checkpoint; `MetricsWriter(..., start_step=S)`
first drops the rows (and TensorBoard events) after S, so each step has one set of rows.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from tensorboardX import SummaryWriter


def flatten(prefix: str, metrics: dict, dataset_names) -> dict:
    """Flattens metric arrays into named scalars (per-exit and per-dataset entries)."""
    out = {}
    for key, value in metrics.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            out[f"{prefix}{key}"] = float(arr)
        elif key.startswith("dataset_") and dataset_names is not None:
            for name, v in zip(dataset_names, arr):
                out[f"{prefix}{key}/{name}"] = float(v)
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{prefix}{key}/{i}"] = float(v)
    return out


class MetricsWriter:
    """Writes on the primary process only; others hold a writer that does nothing.

    start_step: the step the run starts from (0 fresh, else the restored checkpoint's); rows
    of later steps, left by an earlier attempt, are dropped (`dropped` counts them), since
    this run writes them again. On a fresh start every old row goes.
    """

    def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self.dropped = 0
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            purge = None
            if start_step is not None:
                self.dropped = _keep_rows_through(self.path, start_step if start_step else -1)
                purge = start_step + 1 if start_step else 0
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if isinstance(v, str) or math.isfinite(v) else None)
                 for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in values.items():
            if not isinstance(v, str) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _keep_rows_through(path: str, last: int) -> int:
    """Rewrites `path` (atomically) without rows after step `last`, or torn lines a killed
    run left. Returns how many lines went."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = row["step"] <= last
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def read_metrics(workdir: str) -> list[dict]:
    """The rows of workdir/metrics.jsonl; a torn last line (a killed run) is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows

