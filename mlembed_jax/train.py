"""Train an embedding model with the 3D-ML recipe.

    python -m mlembed_jax.train --config=configs/demo.py --workdir=runs/demo \
        [--config.section.field=value ...]

Reads top to bottom: distributed init, config, mesh, data, state (resume, HF or random),
compile, loop (log / validate / checkpoint), final save. Restarting with the same workdir
resumes from its newest intact checkpoint (a damaged one is set aside, saying why); a
resume whose config changes what the run trains needs --allow_config_change; a workdir whose
every checkpoint was damaged needs a new --workdir or --restart_from_scratch.

Exit codes: 0 done; 2 bad input (config, data, checkpoint, a full disk at start), one
`error:` line; 1 stopped by a fault: more than train.max_nonfinite_steps NaN/inf steps in a
row, divergence (train.divergence_factor), or a checkpoint save that failed or would not fit
the disk; 143 SIGTERM, after saving a checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import sys
import time

from mlembed_jax import distributed, sharding, storage

# Must precede every other JAX call (a TPU pod / SLURM / explicit multi-process run).
if __name__ == "__main__":
    distributed.maybe_initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mlembed_jax.attention_choice import resolve_attention  # noqa: E402
from mlembed_jax.batch import text_lengths  # noqa: E402
from mlembed_jax.checkpoint import (  # noqa: E402
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    DataStateBox,
    check_resume_changes,
    init_params_from,
    orbax_log,
    orbax_log_path,
    resume_changes,
)
from mlembed_jax.cli import run_absl_main, writable_dir  # noqa: E402
from mlembed_jax.config import ConfigError, validate  # noqa: E402
from mlembed_jax.data.manifest import ManifestError  # noqa: E402
from mlembed_jax.data.parquet_io import DataError  # noqa: E402
from mlembed_jax.data.pipeline import make_train_iterator, make_validation_iterator  # noqa: E402
from mlembed_jax.data.plan import make_data_plan  # noqa: E402
from mlembed_jax.data.text_encoding import TokenizerError  # noqa: E402
from mlembed_jax.eval.periodic import make_periodic_evaluator  # noqa: E402
from mlembed_jax.metrics_log import MetricsWriter, flatten  # noqa: E402
from mlembed_jax.model.encoder import abstract_params  # noqa: E402
from mlembed_jax.model.qwen3 import param_count  # noqa: E402
from mlembed_jax.perf import flops as flops_lib  # noqa: E402
from mlembed_jax.perf.hlo import memory_line  # noqa: E402
from mlembed_jax.run_summary import (  # noqa: E402
    batch_summary,
    config_summary,
    final_report,
    write_config,
)
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


def _log(msg: str, err: bool = False) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


class _Stop(Exception):
    """Ends the run early with a message (printed as `error: ...`) and an exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run(config, workdir: str, allow_config_change: bool = False,
        restart_from_scratch: bool = False) -> int:
    """Trains until the configured step count or SIGTERM. Returns the process exit code:
    0 done, 143 SIGTERM (saved), 1 stopped by a fault (non-finite steps over the budget,
    a failed save). Bad input raises ConfigError / DataError / CheckpointError."""
    validate(config)
    workdir = writable_dir(workdir, "--workdir")
    preempt = _Preemption()
    _log(config_summary(config, workdir))

    mesh = sharding.make_mesh(config.mesh)
    config, kernel = resolve_attention(config, mesh.devices.flat)
    _log(f"attention: {_attention_line(kernel)}; remat {config.model.remat}")
    rules = config.mesh.logical_axis_rules
    _log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices "
         f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)")

    packs = sharding.packs_per_step(config.data, mesh, rules)
    _log(batch_summary(config, packs, sharding.batch_shards(mesh, rules)))
    pack_range = sharding.process_pack_range(mesh, rules, packs)  # TPU pods: non-contiguous
    t0 = time.time()
    plan = make_data_plan(config, packs)  # every process the same, from the lengths alone
    _log(f"data plan ({time.time() - t0:.1f}s): {plan.describe()}")
    train_iter = make_train_iterator(config, packs, pack_range=pack_range, plan=plan)
    try:
        with orbax_log(orbax_log_path(workdir) if jax.process_index() == 0 else None):
            return _train(config, workdir, mesh, train_iter, pack_range, preempt,
                          (allow_config_change, restart_from_scratch))
    except _Stop as e:
        _log(f"error: {e}", err=True)
        return e.code
    finally:
        train_iter.close()  # the prefetch thread ends with the run, however it ends


def _attention_line(kernel) -> str:
    """'dense (set by model.attention)' rather than the chooser's terse '(asked for: ...)'."""
    if kernel.requested == "auto":
        return kernel.line()
    return f"{kernel.kernel} (set by model.attention={kernel.requested!r})"


def _geometry_line(g) -> str:
    """The step's batch shape in words (batch.BatchGeometry)."""
    return (f"{g.packs} pack(s) of {g.rows_per_pack} rows x {g.seq_len} tokens, up to "
            f"{g.texts_per_pack} texts and {g.samples_per_pack} samples per pack, "
            f"{g.max_negatives} negatives per sample at most")


def _restore_or_init(config, ckpt, step_fns, train_iter, enc, flags_):
    """(state, nonfinite_total): the newest intact checkpoint, train.init_from (an HF
    directory or another run's checkpoint) or random. flags_: (--allow_config_change,
    --restart_from_scratch)."""
    allow_config_change, restart_from_scratch = flags_
    found = ckpt.restore_latest(step_fns.abstract_state, config, DataStateBox, _log,
                                restart_from_scratch)
    if found is not None:
        step, state, data_box, integrity = found
        note = check_resume_changes(resume_changes(ckpt.saved_config(step), config),
                                    allow_config_change, ckpt.step_dir(step))
        if note:
            _log(note)
        train_iter.set_state(data_box.state)
        ckpt.track(step)  # its first step's loss shows whether it is sound
        _log(f"resumed from {ckpt.step_dir(step)}")
        if integrity is None:
            _log(f"note: checkpoint {step} has no fingerprints (saved by an older mlembed_jax): "
                 "checked for NaN/inf only")
        return state, (integrity.nonfinite_total if integrity else 0)
    if config.train.init_from:
        host, what = init_params_from(config.train.init_from, enc, config)
        state = step_fns.init_state(host)
        del host
        _log(what)
        return state, 0
    _log("initialised from scratch (random weights)")
    return step_fns.init_state(), 0


def _train(config, workdir, mesh, train_iter, pack_range, preempt,
           resume_flags) -> int:
    plan = train_iter.plan
    val_batches = make_validation_iterator(config, plan.packs, pack_range=pack_range, plan=plan)
    names = list(train_iter.dataset_names)
    total_steps = (config.train.max_steps if config.train.max_steps > 0
                   else config.train.epochs * train_iter.steps_per_epoch)
    _log(f"data: {len(names)} datasets, {train_iter.steps_per_epoch} steps per epoch, "
         f"{total_steps} steps; largest batch: {_geometry_line(plan.geometry())}")
    _log("data: " + "; ".join(train_iter.negatives_summary()))

    step_fns = build_step(config, mesh, total_steps=total_steps, num_datasets=len(names),
                          geometries=plan.geometries)
    enc = step_fns.setup.enc
    teacher_params = step_fns.load_teacher()
    n_params = param_count(abstract_params(enc))
    _log(f"model: {n_params:,} parameters ({param_count(abstract_params(enc), True):,} "
         f"non-embedding), exits {enc.exits}, MEL "
         f"{'r_max ' + str(enc.mel_r_max) if enc.mel else 'off'}")

    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
        return _loop(config, workdir, mesh, train_iter, preempt, resume_flags, ckpt,
                     step_fns, teacher_params, val_batches, names, total_steps)
    except CheckpointSaveError as e:
        raise _Stop(str(e), 1) from None
    finally:
        with contextlib.suppress(CheckpointSaveError):  # reported above, if it was the cause
            ckpt.close()


def _loop(config, workdir, mesh, train_iter, preempt, resume_flags, ckpt, step_fns,
          teacher_params, val_batches, names, total_steps) -> int:
    """Restore (or init), compile, then step / log / validate / save until the end."""
    primary = jax.process_index() == 0
    single = jax.process_count() == 1
    rules, enc, plan = config.mesh.logical_axis_rules, step_fns.setup.enc, train_iter.plan
    t_start = time.time()
    state, nonfinite_total = _restore_or_init(config, ckpt, step_fns, train_iter, enc,
                                              resume_flags)
    if primary:
        write_config(config, workdir)  # once the config is accepted (a resume may refuse it)
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

    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, enabled=primary, start_step=start)
    if writer.dropped:
        _log(f"metrics.jsonl: dropped {writer.dropped} rows after step {start}, which this "
             "run replays")
    periodic_eval = make_periodic_evaluator(config)  # None unless eval.every > 0
    device_kind = jax.devices()[0].device_kind
    last = {"val": {}, "eval": {}}

    def record(step, values, kind=None):
        writer.write(step, values)
        if kind:
            last[kind] = {"step": step, **values}

    if start == 0 and config.train.eval_every > 0:
        with step_fns.rules_context():  # the baseline the validation loss falls from
            record(0, _validate(eval_fns, state.params, val_batches, plan, mesh, rules,
                                teacher_params, names), "val")
    bar = tqdm(total=total_steps, initial=start, disable=not primary, dynamic_ncols=True,
               desc="train")
    pending, interval_tokens, interval_flops, interval_stats = [], 0, 0.0, []
    t_last = time.time()
    step = start
    streak, budget = 0, int(config.train.max_nonfinite_steps)
    diverged = _DivergenceRule(config.train, float(jax.device_get(_param_norm(state.params))))
    exit_code = 0
    every = config.train
    with step_fns.rules_context(), bar:  # the bar ends its line before any error line
        while step < total_steps:
            batch, stats = next(train_iter)
            gb = sharding.to_global_batch(batch, plan.geometry(stats["rows"]), mesh, rules)
            state, metrics = compiled[stats["rows"]](state, gb, teacher_params)
            step += 1
            stopping = preempt.check(step)  # one reading per step: SIGTERM may come any time
            if single:
                ckpt.poll()  # a failed background save stops the run here, one step late
            lengths = text_lengths(batch)
            interval_tokens += int(lengths.sum())
            interval_flops += flops_lib.train_flops(config.model, lengths)
            interval_stats.append(stats)
            pending.append(metrics)
            if "epoch_end" in stats:
                writer.write(step, _epoch_values(stats["epoch_end"]))
                _log(f"\n{_epoch_line(stats['epoch_end'])}")
            saving = step % every.checkpoint_every == 0 or step == total_steps or stopping

            if step % every.log_every == 0 or step == total_steps or saving:
                host, norm = jax.device_get((pending, _param_norm(state.params)))  # the sync
                if not single:
                    ckpt.poll_all()  # all processes agree on a failed save at log steps
                dt = max(time.time() - t_last, 1e-9)
                values = _interval_values(host, interval_stats, names, interval_tokens,
                                          interval_flops, dt, device_kind, jax.process_count(),
                                          len(mesh.local_devices))
                for i, m in enumerate(host):
                    streak = streak + 1 if m["nonfinite"] else 0
                    if not m["nonfinite"]:  # a loss computed with the previous steps' params
                        ckpt.confirm(step - len(host) + 1 + i)
                nonfinite_total += int(values["train/nonfinite_steps"])
                values["train/nonfinite_total"] = float(nonfinite_total)
                values["train/param_norm"] = float(norm)
                writer.write(step, values)
                bar.set_postfix(loss=f"{values['train/total']:.4f}",
                                lr=f"{values['train/lr']:.2e}",
                                tok_s=f"{values['perf/tokens_per_s']:.0f}")
                pending, interval_tokens, interval_flops, interval_stats = [], 0, 0.0, []
                t_last = time.time()
                if 0 <= budget < streak:
                    raise _Stop(
                        f"step {step}: {streak} steps in a row had a NaN/inf loss or gradient "
                        f"norm and were skipped (train.max_nonfinite_steps={budget}); stopping "
                        f"without saving. Lower optim.lr or check the data. "
                        f"{_after_fault(ckpt)}", 1)
                why = diverged(float(norm))
                if why:
                    raise _Stop(f"step {step}: {why}; stopping without saving. Lower optim.lr "
                                "(AdamW also shrinks every weight by lr x weight_decay a step: "
                                f"at 1 or more it flips and grows them). {_after_fault(ckpt)}",
                                1)
            bar.update(1)

            if every.eval_every > 0 and (step % every.eval_every == 0 or step == total_steps):
                record(step, _validate(eval_fns, state.params, val_batches, plan, mesh,
                                       rules, teacher_params, names), "val")
            if periodic_eval is not None and (step % config.eval.every == 0
                                               or step == total_steps):
                record(step, periodic_eval(state.params, step), "eval")
            if saving:
                ckpt.save(step, state, DataStateBox(train_iter.get_state()), config,
                          nonfinite_total=nonfinite_total, force=True)
                writer.flush()  # the rows a resume from this checkpoint keeps are stored
            if stopping:
                ckpt.wait()
                _log(f"\nSIGTERM: saved step {step} to {ckpt.directory}; exiting")
                exit_code = 143
                break
    bar.close()
    ckpt.wait()
    writer.close()
    if exit_code == 0 and primary:  # it writes WORKDIR/texts.txt
        _log(final_report(workdir, step, time.time() - t_start, last["val"], last["eval"],
                          nonfinite_total, train_iter.inner.summary()))
    return exit_code


@jax.jit
def _param_norm(params):
    """The global L2 norm of the params (a scalar on device; read at log steps)."""
    return optax.tree_utils.tree_norm(params)


class _DivergenceRule:
    """train.divergence_factor: a parameter norm more than that factor above the median of
    the last train.divergence_window readings (or not finite) is divergence. The norm, not
    the loss: per-batch losses differ several-fold between datasets in a healthy run, while
    the norm moves smoothly, and it catches what the NaN guard cannot (weights growing huge
    while the loss stays finite and the clipped gradient norm reads 0). The median over a
    window, not the last reading, so one spike does not become the reference."""

    def __init__(self, train_cfg, start_norm: float):
        self.factor = float(train_cfg.divergence_factor)
        self.window = collections.deque([start_norm], maxlen=int(train_cfg.divergence_window))

    def __call__(self, norm: float) -> str | None:
        """None if `norm` is in line, else why it is not; a norm in line joins the window."""
        ref = float(np.median(self.window))
        if not np.isfinite(norm):
            return f"the parameter norm is {norm} (train.divergence_factor)"
        if self.factor > 0 and np.isfinite(ref) and norm > self.factor * ref:
            return (f"the run diverged: the parameter norm {norm:.4g} is {norm / ref:.3g} times "
                    f"the median of its last {len(self.window)} readings ({ref:.4g}; "
                    f"train.divergence_factor={self.factor:g})")
        self.window.append(norm)
        return None


def _after_fault(ckpt) -> str:
    """What a fault stop leaves: unverified checkpoints set aside (no later step had a
    finite loss with their params), the newest checkpoint on disk, and where a rerun starts."""
    moved = ckpt.set_aside_unverified()  # waits for the save in flight first
    text = "".join(f"Checkpoint {step} was never shown sound (no finite loss after it) and "
                   f"was moved to {dest}. " for step, dest in moved)
    newest = ckpt.newest()
    if newest == "no checkpoint":
        return text + "No checkpoint is left: a rerun with the same --workdir starts afresh."
    return (text + f"Newest checkpoint on disk: {newest}; rerunning with the same --workdir "
            "resumes from it.")


def _interval_values(host_metrics, stats, names, tokens, flops, dt, device_kind, processes,
                     local_devices) -> dict:
    """Means over the steps since the last log, plus speed figures. Skipped (non-finite)
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


def main(argv, config):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        if not FLAGS.workdir:
            raise ConfigError("--workdir is required: the run directory (checkpoints, "
                              "metrics, TensorBoard); rerunning with it resumes")
        code = run(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change,
                   restart_from_scratch=FLAGS.restart_from_scratch)
    except (ConfigError, DataError, ManifestError, TokenizerError, CheckpointError,
            storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard")
    flags.DEFINE_bool("allow_config_change", False, "resume although fields that change what "
                      "the run trains (optim.*, loss.*, data.*, ...) differ from the checkpoint's")
    flags.DEFINE_bool("restart_from_scratch", False, "train from step 0 in a workdir whose every "
                      "checkpoint was found damaged (they stay in WORKDIR/damaged_checkpoints)")
    run_absl_main(main)
