"""What the training loop logs between its steps: each log interval's metrics.jsonl values
(means of the steps since the last log, speed figures) and the one-line descriptions of the
attention kernel, the step's batch shape and a finished epoch."""

from __future__ import annotations

import time

import jax

from mlembed_jax.batch import text_lengths
from mlembed_jax.metrics_log import flatten
from mlembed_jax.perf import flops as flops_lib


class Interval:
    """The steps since the last log: their metrics (on device until the log step reads them
    in one sync), data stats, real tokens and model FLOPs."""

    def __init__(self, model_cfg, names: list[str], local_devices: int):
        self.model_cfg, self.names, self.local_devices = model_cfg, names, local_devices
        self.device_kind = jax.devices()[0].device_kind
        self._reset()

    def _reset(self) -> None:
        self.pending, self.stats, self.tokens, self.flops = [], [], 0, 0.0
        self.t0 = time.time()

    def add(self, metrics, stats: dict, batch: dict) -> None:
        """One step: its metrics (device arrays), its data stats and this process's batch."""
        lengths = text_lengths(batch)
        self.tokens += int(lengths.sum())
        self.flops += flops_lib.train_flops(self.model_cfg, lengths)
        self.stats.append(stats)
        self.pending.append(metrics)

    def values(self, host_metrics: list[dict]) -> dict:
        """metrics.jsonl values of the interval (`host_metrics`: `pending` read to the host),
        then starts the next interval."""
        dt = max(time.time() - self.t0, 1e-9)
        out = interval_values(host_metrics, self.stats, self.names)
        out["perf/tokens_per_s"] = self.tokens * jax.process_count() / dt
        out["perf/step_time_s"] = dt / len(host_metrics)
        mfu = flops_lib.mfu(self.flops, dt, self.device_kind, self.local_devices)
        out["perf/mfu"] = float("nan") if mfu is None else mfu
        self._reset()
        return out


def interval_values(host_metrics: list[dict], stats: list[dict], names) -> dict:
    """Means over the steps since the last log (`stats`: their data stats). Skipped (non-finite)
    steps are left out of the means and counted in train/nonfinite_steps; with none left,
    the means are NaN (null in metrics.jsonl)."""
    steps = len(host_metrics)
    applied = [(m, s) for m, s in zip(host_metrics, stats) if not m["nonfinite"]]
    out = {}
    for m, _ in applied:
        for k, v in flatten("train/", m, names).items():
            out[k] = out.get(k, 0.0) + v / len(applied)
    if not applied:
        out = {k: float("nan") for k in flatten("train/", host_metrics[0], names)}
    out["train/lr"] = sum(float(m["lr"]) for m in host_metrics) / steps  # skipped or not
    out["train/nonfinite_steps"] = float(sum(float(m["nonfinite"]) for m in host_metrics))
    # Per-dataset losses: only the steps that drew that dataset count.
    for name in set(s["dataset"] for _, s in applied):
        vals = [float(m["total"]) for m, s in applied if s["dataset"] == name]
        out[f"train/loss_by_dataset/{name}"] = sum(vals) / len(vals)
    for k in [k for k in out if k.startswith("train/dataset_") or k == "train/nonfinite"]:
        del out[k]
    out["data/padding_fraction"] = sum(s["padding_fraction"] for s in stats) / steps
    out["data/rows_per_pack"] = sum(s["rows"] for s in stats) / steps
    out["data/partial_batches"] = float(sum(s["partial"] for s in stats))
    return out


def epoch_values(summary: dict) -> dict:
    """metrics.jsonl entries of an epoch's coverage (PackedTrainIterator.epoch_summary)."""
    out = {"data/epoch": float(summary["epoch"]), "data/epoch_coverage": summary["coverage"],
           "data/epoch_samples": float(summary["samples"]),
           "data/epoch_partial_batches": float(summary["partial_batches"])}
    for rows, n in summary["steps_by_rows"].items():
        out[f"data/epoch_steps_at_rows/{rows}"] = float(n)
    return out


def epoch_line(summary: dict) -> str:
    """An epoch's coverage in words."""
    shapes = ", ".join(f"{n} at {r} rows" for r, n in summary["steps_by_rows"].items())
    return (f"epoch {summary['epoch']} done: {summary['samples']:,} of "
            f"{summary['train_samples']:,} training samples ({summary['coverage']:.1%}), "
            f"nothing carried over; {summary['steps']} steps ({shapes}), "
            f"{summary['partial_batches']} partial batch(es)")


def attention_line(kernel) -> str:
    """'dense (set by model.attention)' rather than the chooser's terse '(asked for: ...)'."""
    if kernel.requested == "auto":
        return kernel.line()
    return f"{kernel.kernel} (set by model.attention={kernel.requested!r})"


def geometry_line(g) -> str:
    """The step's batch shape in words (batch.BatchGeometry)."""
    return (f"{g.packs} pack(s) of {g.rows_per_pack} rows x {g.seq_len} tokens, up to "
            f"{g.texts_per_pack} texts and {g.samples_per_pack} samples per pack, "
            f"{g.max_negatives} negatives per sample at most")
