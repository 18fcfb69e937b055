"""Train an embedding model with the 3D-ML recipe.

    python -m mlembed_jax.train --config=configs/demo.py --workdir=runs/demo \
        [--config.section.field=value ...]

`run` reads top to bottom: config, mesh, data plan, evaluators (so a bad eval.* setting fails
before anything compiles), step, state (resume, HF or random), compile, loop (log / evaluate
/ checkpoint), final save. Restarting with the same workdir resumes from its newest intact
checkpoint (a damaged one is set aside, saying why); a resume whose config changes what the
run trains needs --allow_config_change; a workdir whose every checkpoint was damaged needs a
new --workdir or --restart_from_scratch.

Exit codes: 0 done; 2 bad input (config, data, checkpoint, a full disk at start), one
`error:` line; 1 stopped by a fault: more than train.max_nonfinite_steps NaN/inf steps in a
row, divergence (train.divergence_factor), or a checkpoint save that failed or would not fit
the disk; 143 SIGTERM, after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
from absl import flags
from absl import logging as absl_logging
from tqdm import tqdm

from mlembed_jax import distributed, sharding, storage
from mlembed_jax.attention_choice import resolve_attention
from mlembed_jax.checkpoint.manager import Checkpointer, CheckpointSaveError, DataStateBox
from mlembed_jax.checkpoint.orbax_logs import orbax_log, orbax_log_path
from mlembed_jax.checkpoint.resume import ResumeOptions, restore_or_init
from mlembed_jax.checkpoint.verify import CheckpointError
from mlembed_jax.cli import run_absl_main, writable_dir
from mlembed_jax.config import ConfigError, validate
from mlembed_jax.data.manifest import ManifestError
from mlembed_jax.data.parquet_io import DataError
from mlembed_jax.data.pipeline import make_train_iterator
from mlembed_jax.data.plan import make_data_plan
from mlembed_jax.data.text_encoding import TokenizerError
from mlembed_jax.divergence import DivergenceRule, param_norm
from mlembed_jax.eval.periodic import make_periodic_evaluator
from mlembed_jax.eval.validation import make_validation_evaluator
from mlembed_jax.lora_run import load_base
from mlembed_jax.metrics_log import MetricsWriter
from mlembed_jax.model.encoder import abstract_params
from mlembed_jax.model.qwen3 import param_count
from mlembed_jax.perf.hlo import memory_line
from mlembed_jax.preemption import Preemption
from mlembed_jax.run_summary import batch_summary, config_summary, final_report, write_config
from mlembed_jax.train_report import (
    Interval,
    attention_line,
    epoch_line,
    epoch_values,
    geometry_line,
)
from mlembed_jax.train_step import build_step


def due(step: int, every: int, total: int) -> bool:
    """Whether a task repeated every `every` steps runs after `step` (1-based) of `total`:
    at each multiple of `every` and at the last step; never when every <= 0. (big_vision's
    itstime.)"""
    return every > 0 and (step % every == 0 or step == total)


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
    divergence, a failed save). Bad input raises ConfigError / DataError / CheckpointError."""
    validate(config)
    workdir = writable_dir(workdir, "--workdir")
    primary, single = jax.process_index() == 0, jax.process_count() == 1
    try:
        with contextlib.ExitStack() as stack:  # closed in reverse, however the run ends
            preempt = stack.enter_context(Preemption())
            _log(config_summary(config, workdir))
            mesh = sharding.make_mesh(config.mesh)
            config, kernel = resolve_attention(config, mesh.devices.flat)
            _log(f"attention: {attention_line(kernel)}; remat {config.model.remat}")
            rules, t = config.mesh.logical_axis_rules, config.train
            _log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices "
                 f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)")

            packs = sharding.packs_per_step(config.data, mesh, rules)
            _log(batch_summary(config, packs, sharding.batch_shards(mesh, rules)))
            pack_range = sharding.process_pack_range(mesh, rules, packs)  # pods: non-contiguous
            t0 = time.time()
            plan = make_data_plan(config, packs)  # every process the same, from the lengths
            _log(f"data plan ({time.time() - t0:.1f}s): {plan.describe()}")
            train_iter = stack.enter_context(contextlib.closing(  # ends the prefetch thread
                make_train_iterator(config, packs, pack_range=pack_range, plan=plan)))
            # The evaluators before anything compiles: a bad eval.* setting fails in seconds.
            validation = make_validation_evaluator(config, plan, mesh, pack_range)
            lora = None  # LoRA: the frozen base (lora_run.py), loaded once the step is built
            periodic = make_periodic_evaluator(config, to_params=(
                (lambda ad: lora.merge(ad)) if config.model.lora.rank > 0 else None))
            evaluators = [e for e in (validation, periodic) if e is not None]
            stack.enter_context(orbax_log(orbax_log_path(workdir) if primary else None))

            names = list(train_iter.dataset_names)
            total_steps = (t.max_steps if t.max_steps > 0
                           else t.epochs * train_iter.steps_per_epoch)
            _log(f"data: {len(names)} datasets, {train_iter.steps_per_epoch} steps per epoch, "
                 f"{total_steps} steps; largest batch: {geometry_line(plan.geometry())}")
            _log("data: " + "; ".join(train_iter.negatives_summary()))
            step_fns = build_step(config, mesh, total_steps=total_steps,
                                  num_datasets=len(names), geometries=plan.geometries)
            enc = step_fns.setup.enc
            teacher_params = step_fns.load_teacher()
            _log(f"model: {param_count(abstract_params(enc)):,} parameters "
                 f"({param_count(abstract_params(enc), True):,} non-embedding), exits "
                 f"{enc.exits}, MEL {'r_max ' + str(enc.mel_r_max) if enc.mel else 'off'}")

            lora = load_base(config, step_fns, _log)
            base = lora.params if lora else None
            base_args = (base,) if lora else ()  # the steps' last argument with LoRA
            ckpt = Checkpointer(workdir, keep=t.keep_checkpoints,
                                lora_base=lora.record if lora else None)
            stack.callback(_close_checkpointer, ckpt)
            t_start = time.time()
            state, nonfinite_total = restore_or_init(
                ckpt, config, step_fns.abstract_state, step_fns.init_state, train_iter,
                ResumeOptions(allow_config_change, restart_from_scratch, log=_log,
                              lora=lora is not None))
            if primary:
                write_config(config, workdir)  # once accepted (a resume may refuse it)
            # One compiled step per row bucket, all before the first step (a step of another
            # shape would be an error, never a recompile).
            t0 = time.time()
            compiled = step_fns.compile_train(state, teacher_params,
                                              rows=plan.shapes_used()["train"], base_params=base)
            n_eval = (validation.compile(step_fns, state.params, teacher_params, base)
                      if validation else 0)
            largest = max(compiled)
            _log(f"compiled {len(compiled)} train step shape(s) (rows per pack "
                 f"{sorted(compiled)}) and {n_eval} eval shape(s) in {time.time() - t0:.1f}s; "
                 f"largest ({largest} rows): {memory_line(compiled[largest])}")

            start = int(jax.device_get(state.step))
            writer = MetricsWriter(workdir, enabled=primary, start_step=start)
            stack.callback(writer.close)
            if writer.dropped:
                _log(f"metrics.jsonl: dropped {writer.dropped} rows after step {start}, which "
                     "this run replays")
            last = {"val": {}, "eval": {}}  # each evaluator's latest values, for the report

            def evaluate(ev, step):
                values = ev(state.params, step)
                writer.write(step, values)
                last[ev.name] = {"step": step, **values}

            interval = Interval(config.model, names, len(mesh.local_devices))
            streak, budget = 0, int(t.max_nonfinite_steps)
            # With LoRA state.params are the adapters: their norm is the one that can diverge.
            diverged = DivergenceRule(t, float(jax.device_get(param_norm(state.params))))
            step, exit_code = start, 0
            with step_fns.rules_context():
                for ev in evaluators:
                    if start == 0 and ev.at_start:  # the baseline the run improves on
                        evaluate(ev, 0)
                with tqdm(total=total_steps, initial=start, disable=not primary,
                          dynamic_ncols=True, desc="train") as bar:  # ends before an error line
                    while step < total_steps:
                        batch, stats = next(train_iter)
                        gb = sharding.to_global_batch(batch, plan.geometry(stats["rows"]), mesh,
                                                      rules)
                        state, metrics = compiled[stats["rows"]](state, gb, teacher_params,
                                                                 *base_args)
                        step += 1
                        stopping = preempt.check(step)  # once per step: SIGTERM may come any time
                        if single:
                            ckpt.poll(metrics)  # a failed background save stops the run soon
                        interval.add(metrics, stats, batch)
                        if "epoch_end" in stats:
                            writer.write(step, epoch_values(stats["epoch_end"]))
                            _log(f"\n{epoch_line(stats['epoch_end'])}")
                        # The last step is saved whatever checkpoint_every says, as on SIGTERM.
                        saving = (due(step, t.checkpoint_every, total_steps)
                                  or step == total_steps or stopping)

                        if due(step, t.log_every, total_steps) or saving:
                            host, norm = jax.device_get((interval.pending,
                                                         param_norm(state.params)))  # the sync
                            if not single:
                                ckpt.poll_all()  # all processes agree on a failed save here
                            values = interval.values(host)
                            for i, m in enumerate(host):
                                streak = streak + 1 if m["nonfinite"] else 0
                                if not m["nonfinite"]:  # a loss computed with the previous params
                                    ckpt.confirm(step - len(host) + 1 + i)
                            nonfinite_total += int(values["train/nonfinite_steps"])
                            values["train/nonfinite_total"] = float(nonfinite_total)
                            values["train/param_norm"] = float(norm)
                            writer.write(step, values)
                            bar.set_postfix(loss=f"{values['train/total']:.4f}",
                                            lr=f"{values['train/lr']:.2e}",
                                            tok_s=f"{values['perf/tokens_per_s']:.0f}")
                            _check_health(step, streak, budget, diverged(float(norm)), ckpt)
                        bar.update(1)

                        for ev in evaluators:
                            if due(step, ev.every, total_steps):
                                evaluate(ev, step)
                        if saving:
                            ckpt.save(step, state, DataStateBox(train_iter.get_state()), config,
                                      nonfinite_total=nonfinite_total, force=True)
                            writer.flush()  # the rows a resume from this checkpoint keeps
                        if stopping:
                            ckpt.wait()
                            _log(f"\nSIGTERM: saved step {step} to {ckpt.directory}; exiting")
                            exit_code = 143
                            break
            ckpt.wait()
            writer.close()
            if exit_code == 0 and primary:  # it writes WORKDIR/texts.txt
                _log(final_report(workdir, step, time.time() - t_start, last["val"],
                                  last["eval"], nonfinite_total, train_iter.inner.summary()))
            return exit_code
    except CheckpointSaveError as e:
        _log(f"error: {e}", err=True)
        return 1
    except _Stop as e:
        _log(f"error: {e}", err=True)
        return e.code


def _close_checkpointer(ckpt) -> None:
    with contextlib.suppress(CheckpointSaveError):  # reported already, if it was the cause
        ckpt.close()


def _check_health(step: int, streak: int, budget: int, why_diverged: str | None,
                  ckpt) -> None:
    """Raises _Stop (exit 1, nothing saved) after more than `budget` non-finite steps in a
    row (train.max_nonfinite_steps; -1 = never) or when the divergence rule fired."""
    if 0 <= budget < streak:
        raise _Stop(f"step {step}: {streak} steps in a row had a NaN/inf loss or gradient "
                    f"norm and were skipped (train.max_nonfinite_steps={budget}); stopping "
                    f"without saving. Lower optim.lr or check the data. {_after_fault(ckpt)}", 1)
    if why_diverged:
        raise _Stop(f"step {step}: {why_diverged}; stopping without saving. Lower optim.lr "
                    "(AdamW also shrinks every weight by lr x weight_decay a step: at 1 or more "
                    f"it flips and grows them). {_after_fault(ckpt)}", 1)


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


FLAGS = flags.FLAGS


def main(argv, config):
    del argv
    distributed.maybe_initialize()  # before the first JAX call: a pod, SLURM, several processes
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
