"""Where metrics go: one JSON line per log step in workdir/metrics.jsonl, and TensorBoard."""

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
    """Writes on the primary process only; others hold a writer that does nothing."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

