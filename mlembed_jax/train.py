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

from mlembed_jax import distributed

# Must precede every other JAX call (a TPU pod / SLURM / explicit multi-process run).
if __name__ == "__main__":
    distributed.maybe_initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mlembed_jax import flops as flops_lib  # noqa: E402
from mlembed_jax.batch import text_lengths  # noqa: E402
from mlembed_jax.checkpoint import Checkpointer, abstract_with_shardings  # noqa: E402
from mlembed_jax.config import ConfigError, check_attention_platform, validate  # noqa: E402
from mlembed_jax.data.global_batch import packs_per_step, to_global_batch  # noqa: E402
from mlembed_jax.data.pipeline import (make_train_iterator,  # noqa: E402
                                       make_validation_iterator)
from mlembed_jax.data_state import DataStateBox  # noqa: E402
from mlembed_jax.loss import config_kwargs  # noqa: E402
from mlembed_jax.metrics_log import MetricsWriter, flatten  # noqa: E402
from mlembed_jax.model.encoder import abstract_params, param_logical_axes  # noqa: E402
from mlembed_jax.model.hf_import import (encoder_config_from_hf,  # noqa: E402
                                         load_hf_params)
from mlembed_jax.model.qwen3 import EncoderConfig, param_count  # noqa: E402
from mlembed_jax.optim import make_optimizer  # noqa: E402
from mlembed_jax.periodic_eval import make_periodic_evaluator  # noqa: E402
from mlembed_jax.sharding import activation_rules, logical_shardings, make_mesh  # noqa: E402
from mlembed_jax.state_init import abstract_state, init_state, place_params  # noqa: E402
from mlembed_jax.train_step import (StepSetup, jit_steps,  # noqa: E402
                                    state_shardings)


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


def _memory_report(compiled) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # some backends have no memory analysis
        return f"memory analysis unavailable ({e})"
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 2 ** 30
    return (f"per device: arguments {m.argument_size_in_bytes / gib:.3f} GiB, outputs "
            f"{m.output_size_in_bytes / gib:.3f} GiB, temporaries {m.temp_size_in_bytes / gib:.3f}"
            f" GiB, aliased {m.alias_size_in_bytes / gib:.3f} GiB")


def _load_teacher(config, enc: EncoderConfig, mesh, rules):
    if not config.loss.teacher:
        return None, None, None
    teacher = encoder_config_from_hf(config.loss.teacher, compute_dtype=enc.compute_dtype,
                                     param_dtype=enc.compute_dtype, attention=enc.attention,
                                     exits=())
    teacher = teacher.truncated(teacher.num_layers)  # one exit: the last layer
    if teacher.vocab_size < enc.vocab_size:
        raise ConfigError(f"teacher {config.loss.teacher!r} has vocab {teacher.vocab_size}, "
                          f"smaller than the student's {enc.vocab_size}; use a teacher with "
                          "the same tokenizer")
    sh = logical_shardings(param_logical_axes(teacher), mesh, rules)
    params = place_params(load_hf_params(config.loss.teacher, teacher), sh, teacher.param_dtype)
    return teacher, params, sh


def run(config, workdir: str) -> int:
    """Trains until the configured step count or SIGTERM. Returns the process exit code."""
    validate(config)
    preempt = _Preemption()
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    _log(f"config:\n{config}")

    mesh = make_mesh(config.mesh)
    check_attention_platform(config, mesh.devices.flat[0].platform)
    rules = config.mesh.logical_axis_rules
    _log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices "
         f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)")

    packs = packs_per_step(config.data, mesh)
    pack_range = distributed.process_pack_range(mesh, packs)  # TPU pods: non-contiguous
    train_iter = make_train_iterator(config, packs, pack_range=pack_range)
    val_batches = make_validation_iterator(config, packs, pack_range=pack_range)
    geometry = train_iter.global_geometry
    names = list(train_iter.dataset_names)
    total_steps = (config.train.max_steps if config.train.max_steps > 0
                   else config.train.epochs * train_iter.steps_per_epoch)
    _log(f"data: {len(names)} datasets, {train_iter.steps_per_epoch} steps per epoch, "
         f"{total_steps} steps; batch geometry {geometry}")

    enc = EncoderConfig.from_config(config.model)
    tx, schedule = make_optimizer(config.optim, total_steps)
    teacher_cfg, teacher_params, teacher_sh = _load_teacher(config, enc, mesh, rules)
    setup = StepSetup(enc=enc, geometry=geometry, tx=tx, schedule=schedule,
                      loss_kwargs=config_kwargs(config.loss, packs=geometry.packs),
                      num_datasets=len(names), teacher=teacher_cfg)
    n_params = param_count(abstract_params(enc))
    _log(f"model: {n_params:,} parameters ({param_count(abstract_params(enc), True):,} "
         f"non-embedding), exits {enc.exits}, MEL {'r_max ' + str(enc.mel_r_max) if enc.mel else 'off'}")

    abstract = abstract_state(setup, config.train.seed)
    state_sh = state_shardings(setup, mesh, rules, abstract)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_box = ckpt.restore(latest, abstract_with_shardings(abstract, state_sh),
                                       config, DataStateBox())
        train_iter.set_state(data_box.state)
        _log(f"resumed from {ckpt.directory}/{latest}")
    elif config.train.init_from:
        host = load_hf_params(config.train.init_from, enc, allow_fewer_layers=True)
        state = init_state(setup, state_sh, config.train.seed, host)
        del host
        _log(f"initialised from HF checkpoint {config.train.init_from}")
    else:
        state = init_state(setup, state_sh, config.train.seed)
        _log("initialised from scratch (random weights)")

    train_fn, eval_fn = jit_steps(setup, mesh, state_sh, teacher_sh)
    with activation_rules(mesh, rules):
        first_batch, first_stats = next(train_iter)
        gb = to_global_batch(first_batch, geometry, mesh)
        t0 = time.time()
        compiled = train_fn.lower(state, gb, teacher_params).compile()
        _log(f"compiled train step in {time.time() - t0:.1f}s; {_memory_report(compiled)}")

    writer = MetricsWriter(workdir, enabled=primary)
    retrieval_eval = make_periodic_evaluator(config)  # None unless eval.every > 0
    device_kind = jax.devices()[0].device_kind
    start = int(jax.device_get(state.step))
    if start == 0 and config.train.eval_every > 0:
        with activation_rules(mesh, rules):  # the baseline the validation loss falls from
            writer.write(0, _validate(eval_fn, state.params, val_batches, geometry, mesh,
                                      teacher_params, names))
    bar = tqdm(total=total_steps, initial=start, disable=not primary, dynamic_ncols=True,
               desc="train")
    pending, interval_tokens, interval_flops, interval_stats = [], 0, 0.0, []
    t_last = time.time()
    step = start
    pending_batch = (first_batch, first_stats)
    exit_code = 0
    with activation_rules(mesh, rules):
        while step < total_steps:
            batch, stats = pending_batch if pending_batch else next(train_iter)
            pending_batch = None
            gb = to_global_batch(batch, geometry, mesh)
            state, metrics = compiled(state, gb, teacher_params)
            step += 1
            preempt.check(step)
            lengths = text_lengths(batch)
            interval_tokens += int(lengths.sum())
            interval_flops += flops_lib.train_flops(config.model, lengths)
            interval_stats.append(stats)
            pending.append(metrics)

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
                writer.write(step, _validate(eval_fn, state.params, val_batches, geometry, mesh,
                                             teacher_params, names))
            if retrieval_eval is not None and (step % config.eval.every == 0
                                               or step == total_steps):
                writer.write(step, retrieval_eval(state.params, step))
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
    out["data/carried_over"] = float(sum(s["carried_over"] for s in stats))
    out["perf/tokens_per_s"] = tokens * processes / dt
    out["perf/step_time_s"] = dt / steps
    mfu = flops_lib.mfu(flops, dt, device_kind, local_devices)
    out["perf/mfu"] = float("nan") if mfu is None else mfu
    return out


def _validate(eval_fn, params, val_batches, geometry, mesh, teacher_params, names) -> dict:
    """Means of the eval metrics over the whole held-out split: sample-weighted, except the
    in-batch accuracy and its chance level, which only retrieval samples have."""
    retrieval_only = ("acc_in_batch", "acc_in_batch_chance")
    sums, weights = {}, {"samples": 0.0, "retrieval": 0.0}
    per_dataset: dict[str, list[float]] = {}
    for batch, stats in val_batches:
        m = jax.device_get(eval_fn(params, to_global_batch(batch, geometry, mesh),
                                   teacher_params))
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
