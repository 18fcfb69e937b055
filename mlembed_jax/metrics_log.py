"""Where metrics go: one JSON line per log step in workdir/metrics.jsonl, and TensorBoard.

A resumed run replays the steps after its checkpoint; `MetricsWriter(..., start_step=S)`
first drops the rows (and TensorBoard events) after S, so each step has one set of rows.

A workdir on an object store (gs://) cannot be appended to: there the writer keeps the
file's lines in memory and uploads the whole file on `flush()`, at most every
`flush_every_s` seconds and whenever the run saves a checkpoint (so the rows up to a
checkpoint are stored before a resume from it could need them). TensorBoard goes through
tensorboardX's own gs:// writer, which likewise re-uploads its event file (every 2 minutes).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary

from mlembed_jax import storage


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

    def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None,
                 flush_every_s: float = 60.0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self.dropped = 0
        # URL workdirs: every line of the file, uploaded whole by flush() (None: local append).
        self._lines: list[str] | None = [] if storage.is_url(workdir) else None
        self._flush_every_s, self._flushed_at, self._unflushed = flush_every_s, time.time(), 0
        if enabled:
            storage.makedirs(workdir)
            purge = None
            if start_step is not None:
                self.dropped = _keep_rows_through(self.path, start_step if start_step else -1)
                purge = start_step + 1 if start_step else 0
            if self._lines is not None and storage.exists(self.path):
                with storage.open(self.path) as f:
                    self._lines = [line for line in f if line.endswith("\n")]
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if isinstance(v, str) or math.isfinite(v) else None)
                 for k, v in values.items()}
        line = json.dumps({"step": step, **clean}) + "\n"
        # The tag is the metric's own name: add_scalar would rewrite characters outside
        # [-/\w.] to '_' (dataset names such as xcodeeval_code2code_C++ / _C#), so the
        # TensorBoard tag and the metrics.jsonl key would differ and could collide.
        scalars = [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
                   if not isinstance(v, str) and math.isfinite(v)]
        if scalars:
            self._tb._get_file_writer().add_summary(Summary(value=scalars), step)
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(line)
            self._tb.flush()
            return
        self._lines.append(line)
        self._unflushed += 1
        if time.time() - self._flushed_at >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Stores every row written so far (a URL workdir: one upload of the whole file)."""
        if not self.enabled or self._lines is None or not self._unflushed:
            return
        storage.write_text_atomic("".join(self._lines), self.path)
        self._tb.flush()
        self._flushed_at, self._unflushed = time.time(), 0

    def close(self):
        self.flush()
        if self._tb is not None:
            self._tb.close()


def _keep_rows_through(path: str, last: int) -> int:
    """Rewrites `path` (atomically) without rows after step `last`, or torn lines a killed
    run left. Returns how many lines went."""
    if not storage.exists(path):
        return 0
    kept, dropped = [], 0
    with storage.open(path) as f:
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
        storage.write_text_atomic("".join(kept), path)
    return dropped


def read_metrics(workdir: str) -> list[dict]:
    """The rows of workdir/metrics.jsonl; a torn last line (a killed run) is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    with storage.open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows

