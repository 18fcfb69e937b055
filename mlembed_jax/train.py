"""Train an embedding model with the 3D-ML recipe.

    python -m mlembed_jax.train --config=configs/demo.py --workdir=runs/demo \
        [--config.section.field=value ...]

Reads top to bottom: distributed init, config, mesh, data, state (resume, HF or random),
compile, loop (log / validate / checkpoint), final save. Restarting with the same workdir
resumes from its latest checkpoint; SIGTERM saves a checkpoint and exits with code 143.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mlembed_jax import distributed, sharding

# Must precede every other JAX call (a TPU pod / SLURM / explicit multi-process run).
if __name__ == "__main__":
    distributed.maybe_initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mlembed_jax.batch import text_lengths  # noqa: E402
from mlembed_jax.checkpoint import Checkpointer, DataStateBox, init_params_from  # noqa: E402
from mlembed_jax.config import ConfigError, validate  # noqa: E402
from mlembed_jax.data.manifest import ManifestError  # noqa: E402
from mlembed_jax.data.pipeline import make_train_iterator, make_validation_iterator  # noqa: E402
from mlembed_jax.data.plan import make_data_plan  # noqa: E402
from mlembed_jax.data.prepare import DataError  # noqa: E402
from mlembed_jax.eval.periodic import make_periodic_evaluator  # noqa: E402
from mlembed_jax.metrics_log import MetricsWriter, flatten  # noqa: E402
from mlembed_jax.model.encoder import abstract_params  # noqa: E402
from mlembed_jax.model.kernel_check import resolve_attention  # noqa: E402
from mlembed_jax.model.qwen3 import param_count  # noqa: E402
from mlembed_jax.perf import flops as flops_lib  # noqa: E402
from mlembed_jax.perf.hlo import memory_line  # noqa: E402
from mlembed_jax.train_step import build_step  # noqa: E402


class _Preemption:
    """SIGTERM sets a flag; the loop saves and stops at the next step boundary.

    With several processes, all must stop at the same step (a checkpoint save is collective),
    so JAX's preemption service decides: it catches SIGTERM in any process, and
    reached_preemption_sync_point turns true on every process at one common step.
    """

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        if not self.multi:  # a Python handler would replace the service's own
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        """Called once per step, with the same step on every process."""
        if self.multi:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run(config, workdir: str) -> int:
    """Trains until the configured step count or SIGTERM. Returns the process exit code."""
    validate(config)
    preempt = _Preemption()
    os.makedirs(workdir, exist_ok=True)
    _log(f"config:\n{config}")

    mesh = sharding.make_mesh(config.mesh)
    config, kernel = resolve_attention(config, mesh.devices.flat)
    _log(f"attention: {kernel.line()}; remat {config.model.remat}")
    rules = config.mesh.logical_axis_rules
    _log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices "
         f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)")

    packs = sharding.packs_per_step(config.data, mesh, rules)
    pack_range = sharding.process_pack_range(mesh, rules, packs)  # TPU pods: non-contiguous
    t0 = time.time()
    plan = make_data_plan(config, packs)  # every process the same, from the lengths alone
    _log(f"data plan ({time.time() - t0:.1f}s): {plan.describe()}")
    train_iter = make_train_iterator(config, packs, pack_range=pack_range, plan=plan)
    try:
        return _train(config, workdir, mesh, train_iter, pack_range, preempt)
    finally:
        train_iter.close()  # the prefetch thread ends with the run, however it ends


def _train(config, workdir, mesh, train_iter, pack_range, preempt) -> int:
    primary = jax.process_index() == 0
    rules = config.mesh.logical_axis_rules
    plan = train_iter.plan
    val_batches = make_validation_iterator(config, plan.packs, pack_range=pack_range, plan=plan)
    names = list(train_iter.dataset_names)
    total_steps = (config.train.max_steps if config.train.max_steps > 0
                   else config.train.epochs * train_iter.steps_per_epoch)
    _log(f"data: {len(names)} datasets, {train_iter.steps_per_epoch} steps per epoch, "
         f"{total_steps} steps; largest batch geometry {plan.geometry()}")

    step_fns = build_step(config, mesh, total_steps=total_steps, num_datasets=len(names),
                          geometries=plan.geometries)
    enc = step_fns.setup.enc
    teacher_params = step_fns.load_teacher()
    n_params = param_count(abstract_params(enc))
    _log(f"model: {n_params:,} parameters ({param_count(abstract_params(enc), True):,} "
         f"non-embedding), exits {enc.exits}, MEL "
         f"{'r_max ' + str(enc.mel_r_max) if enc.mel else 'off'}")

    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_box = ckpt.restore(latest, step_fns.abstract_state, config, DataStateBox())
        train_iter.set_state(data_box.state)
        _log(f"resumed from {ckpt.directory}/{latest}")
    elif config.train.init_from:
        host, what = init_params_from(config.train.init_from, enc, config)
        state = step_fns.init_state(host)
        del host
        _log(what)
    else:
        state = step_fns.init_state()
        _log("initialised from scratch (random weights)")

    # One compiled step per row bucket, all before the first step (a step of another shape
    # would be an error, never a recompile).
    used = plan.shapes_used()
    t0 = time.time()
    compiled = step_fns.compile_train(state, teacher_params, rows=used["train"])
    eval_fns = (step_fns.compile_eval(state.params, teacher_params, rows=used["validation"])
                if config.train.eval_every > 0 else {})
    largest = max(compiled)
    _log(f"compiled {len(compiled)} train step shape(s) (rows per pack {sorted(compiled)}) and "
         f"{len(eval_fns)} eval shape(s) in {time.time() - t0:.1f}s; largest "
         f"({largest} rows): {memory_line(compiled[largest])}")

    writer = MetricsWriter(workdir, enabled=primary)
    periodic_eval = make_periodic_evaluator(config)  # None unless eval.every > 0
    device_kind = jax.devices()[0].device_kind
    start = int(jax.device_get(state.step))
    if start == 0 and config.train.eval_every > 0:
        with step_fns.rules_context():  # the baseline the validation loss falls from
            writer.write(0, _validate(eval_fns, state.params, val_batches, plan, mesh,
                                      rules, teacher_params, names))
    bar = tqdm(total=total_steps, initial=start, disable=not primary, dynamic_ncols=True,
               desc="train")
    pending, interval_tokens, interval_flops, interval_stats = [], 0, 0.0, []
    t_last = time.time()
    step = start
    exit_code = 0
    with step_fns.rules_context():
        while step < total_steps:
            batch, stats = next(train_iter)
            gb = sharding.to_global_batch(batch, plan.geometry(stats["rows"]), mesh, rules)
            state, metrics = compiled[stats["rows"]](state, gb, teacher_params)
            step += 1
            preempt.check(step)
            lengths = text_lengths(batch)
            interval_tokens += int(lengths.sum())
            interval_flops += flops_lib.train_flops(config.model, lengths)
            interval_stats.append(stats)
            pending.append(metrics)
            if "epoch_end" in stats:
                writer.write(step, _epoch_values(stats["epoch_end"]))
                _log(f"\n{_epoch_line(stats['epoch_end'])}")

            if step % config.train.log_every == 0 or step == total_steps or preempt.requested:
                host = jax.device_get(pending)  # the only host sync of the interval
                dt = max(time.time() - t_last, 1e-9)
                values = _interval_values(host, interval_stats, names, interval_tokens,
                                          interval_flops, dt, device_kind, jax.process_count(),
                                          len(mesh.local_devices))
                writer.write(step, values)
                bar.set_postfix(loss=f"{values['train/total']:.4f}",
                                lr=f"{values['train/lr']:.2e}",
                                tok_s=f"{values['perf/tokens_per_s']:.0f}")
                pending, interval_tokens, interval_flops, interval_stats = [], 0, 0.0, []
                t_last = time.time()
            bar.update(1)

            if config.train.eval_every > 0 and (step % config.train.eval_every == 0
                                                or step == total_steps):
                writer.write(step, _validate(eval_fns, state.params, val_batches, plan, mesh,
                                             rules, teacher_params, names))
            if periodic_eval is not None and (step % config.eval.every == 0
                                               or step == total_steps):
                writer.write(step, periodic_eval(state.params, step))
            if step % config.train.checkpoint_every == 0 or step == total_steps \
                    or preempt.requested:
                ckpt.save(step, state, DataStateBox(train_iter.get_state()), config,
                          force=True)
            if preempt.requested:
                _log(f"\nSIGTERM: saved step {step} to {ckpt.directory}; exiting")
                exit_code = 143
                break
    bar.close()
    ckpt.close()
    writer.close()
    if exit_code == 0:
        _log(f"done: {step} steps; data: {train_iter.inner.summary()}")
    return exit_code


def _interval_values(host_metrics, stats, names, tokens, flops, dt, device_kind, processes,
                     local_devices) -> dict:
    """Means over the steps since the last log, plus speed figures."""
    steps = len(host_metrics)
    out = {}
    for m in host_metrics:
        for k, v in flatten("train/", m, names).items():
            out[k] = out.get(k, 0.0) + v / steps
    # Per-dataset losses: only the steps that drew that dataset count.
    for name in set(s["dataset"] for s in stats):
        vals = [float(m["total"]) for m, s in zip(host_metrics, stats) if s["dataset"] == name]
        out[f"train/loss_by_dataset/{name}"] = sum(vals) / len(vals)
    for k in [k for k in out if k.startswith("train/dataset_")]:
        del out[k]
    out["data/padding_fraction"] = sum(s["padding_fraction"] for s in stats) / steps
    out["data/rows_per_pack"] = sum(s["rows"] for s in stats) / steps
    out["data/partial_batches"] = float(sum(s["partial"] for s in stats))
    out["perf/tokens_per_s"] = tokens * processes / dt
    out["perf/step_time_s"] = dt / steps
    mfu = flops_lib.mfu(flops, dt, device_kind, local_devices)
    out["perf/mfu"] = float("nan") if mfu is None else mfu
    return out


def _epoch_values(summary: dict) -> dict:
    """metrics.jsonl entries of an epoch's coverage (PackedTrainIterator.epoch_summary)."""
    out = {"data/epoch": float(summary["epoch"]), "data/epoch_coverage": summary["coverage"],
           "data/epoch_samples": float(summary["samples"]),
           "data/epoch_partial_batches": float(summary["partial_batches"])}
    for rows, n in summary["steps_by_rows"].items():
        out[f"data/epoch_steps_at_rows/{rows}"] = float(n)
    return out


def _epoch_line(summary: dict) -> str:
    shapes = ", ".join(f"{n} at {r} rows" for r, n in summary["steps_by_rows"].items())
    return (f"epoch {summary['epoch']} done: {summary['samples']:,} of "
            f"{summary['train_samples']:,} training samples ({summary['coverage']:.1%}), "
            f"nothing carried over; {summary['steps']} steps ({shapes}), "
            f"{summary['partial_batches']} partial batch(es)")


def _validate(eval_fns, params, val_batches, plan, mesh, rules, teacher_params,
              names) -> dict:
    """Means of the eval metrics over the whole held-out split: sample-weighted, except the
    in-batch accuracy and its chance level, which only retrieval samples have."""
    retrieval_only = ("acc_in_batch", "acc_in_batch_chance")
    sums, weights = {}, {"samples": 0.0, "retrieval": 0.0}
    per_dataset: dict[str, list[float]] = {}
    for batch, stats in val_batches:
        gb = sharding.to_global_batch(batch, plan.geometry(stats["rows"]), mesh, rules)
        m = jax.device_get(eval_fns[stats["rows"]](params, gb, teacher_params))
        w = {"samples": float(m["num_samples"]), "retrieval": float(m["num_in_batch"])}
        if w["samples"] == 0:
            continue
        for k, v in m.items():
            if np.ndim(v) == 0 and not k.startswith("num_"):
                kind = "retrieval" if k in retrieval_only else "samples"
                sums[k] = sums.get(k, 0.0) + float(v) * w[kind]
        per_dataset.setdefault(stats["dataset"], []).append(float(m["total"]))
        for kind in weights:
            weights[kind] += w[kind]
    out = {}
    for k, v in sums.items():
        weight = weights["retrieval" if k in retrieval_only else "samples"]
        if weight > 0:
            out[f"val/{k}"] = v / weight
    for name, vals in per_dataset.items():
        out[f"val/loss_by_dataset/{name}"] = sum(vals) / len(vals)
    weight = weights["samples"]
    out["val/samples"] = weight
    return out


FLAGS = flags.FLAGS


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        code = run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
