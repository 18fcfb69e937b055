"""What a training run tells its user: a short config summary at the start (the full config
goes to WORKDIR/run_config.json; not config.json, which marks a Hugging Face directory) and,
at the end, where the run is, its final figures and the commands to run on it next."""

from __future__ import annotations

import json
import os
import shlex
import sys

from mlembed_jax import storage
from mlembed_jax.config import config_json
from mlembed_jax.grad_cache import resolve_chunks


def write_config(config, workdir: str) -> str:
    """WORKDIR/run_config.json (written atomically); returns its path. StorageError (one
    line) when it cannot be written, e.g. on a full disk."""
    path = os.path.join(workdir, "run_config.json")
    try:
        storage.write_text_atomic(json.dumps(config_json(config), indent=1), path)
    except OSError as e:
        raise storage.StorageError(f"cannot write {path}: {e.strerror or e}; free some space "
                                   "on that disk or choose another --workdir") from None
    return path


def config_summary(config, workdir: str) -> str:
    """A few lines: model, data, optimizer, loss, schedule of steps."""
    m, d, o, ls, t = config.model, config.data, config.optim, config.loss, config.train
    mel = f"MEL ranks {m.mel_r_min}..{m.mel_r_max}" if m.mel else "MEL off"
    length = (f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs} epochs")
    kd = f", KD from {ls.teacher} (weight {ls.kd_weight:g})" if ls.teacher else ""
    return "\n".join([
        f"run: {workdir} (full config: {os.path.join(workdir, 'run_config.json')})",
        f"model: Qwen3 {m.num_layers} layers, d={m.hidden_size}, {m.num_heads} heads "
        f"({m.num_kv_heads} kv), vocab {m.vocab_size}, {mel}; params {m.param_dtype}, compute "
        f"{m.compute_dtype}, attention {m.attention}, remat {m.remat}; init "
        f"{t.init_from or 'random'}",
        f"data: {d.prepared_dir} (manifest {d.manifest or 'as prepared'}); packs of "
        f"{_rows(d.rows_per_pack)} x {d.seq_len} tokens, {d.samples_per_pack} samples each",
        f"optim: AdamW lr {o.lr:g} -> {o.min_lr:g} ({o.schedule}, {o.warmup_steps} warmup "
        f"steps), wd {o.weight_decay:g}, clip {o.grad_clip:g}; loss: temperature "
        f"{ls.temperature:g}, MRL dims down to {ls.mrl_min_dim}{kd}",
        f"train: {length}, seed {t.seed}; log every {t.log_every}, validate every "
        f"{t.validation_every}, checkpoint every {t.checkpoint_every} (keep {t.keep_checkpoints})",
    ])


def batch_summary(config, packs: int, shards: int) -> str:
    """One line: the step's global batch in samples, how it splits over the batch shards
    (devices) and, when on, the cached-gradient chunks (train.grad_cache_chunks)."""
    B = int(config.data.samples_per_pack)
    set_by = (f"data.packs_per_step={packs}" if config.data.packs_per_step != -1
              else "data.packs_per_step=-1: one pack per batch shard")

    def n(k, what):
        return f"{k} {what}" + ("" if k == 1 else "s")

    line = (f"global batch: {packs * B} samples per step = {n(packs, 'pack')} x "
            f"{n(B, 'sample')} ({set_by}); {n(packs // shards, 'pack')} on each of "
            f"{n(shards, 'batch shard')}")
    chunks = resolve_chunks(int(config.train.grad_cache_chunks), packs, shards)
    if chunks:
        line += f", one at a time ({n(chunks, 'cached-gradient chunk')})"
    return line


def _rows(rows) -> str:
    if rows in ((), None, 0):  # derived from the data's lengths when the plan is made
        return "N rows (the row buckets in the data plan line below)"
    return f"{rows} rows"


def python_command() -> str:
    """How to call this Python from the current directory in a fresh shell: `python` when a
    virtualenv is active (or none is used), else this interpreter's path (`.venv/bin/python`
    after `make demo`)."""
    in_venv = sys.prefix != sys.base_prefix
    if not in_venv or os.environ.get("VIRTUAL_ENV") == sys.prefix:
        return "python"
    exe = sys.executable
    rel = os.path.relpath(exe)
    return rel if not rel.startswith("..") else exe


# Written into the run directory so the printed encode command runs as is.
EXAMPLE_TEXTS = ("Deutschland\nAllemagne\nGermany\n日本\nJapon\nMonday\nlundi\n")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def final_report(workdir: str, step: int, seconds: float, val: dict, retrieval: dict,
                 nonfinite_total: int, data_summary: str) -> str:
    """The end-of-run lines: figures of the last validation / retrieval evaluation and the
    next commands (encode, export, report) with this run's directory filled in."""
    run = shlex.quote(workdir)
    name = os.path.basename(storage.normalized(workdir))
    # The report tool writes local files only.
    report = os.path.join("reports", name) if storage.is_url(workdir) else os.path.join(
        workdir, "report")
    lines = [f"done: {step} steps in {seconds:.0f} s; data: {data_summary}",
             f"run directory: {workdir} (metrics.jsonl, tensorboard/, checkpoints/, "
             "run_config.json)"]
    if val:
        lines.append(f"final validation (step {val['step']}): loss {_fmt(val.get('val/total'))}"
                     f", in-batch accuracy {_fmt(val.get('val/acc_in_batch'))} (chance "
                     f"{_fmt(val.get('val/acc_in_batch_chance'))})")
    for eval_set in sorted({k.split("/")[1] for k in retrieval if k.count("/") == 2}):
        get = lambda metric: _fmt(retrieval.get(f"eval/{eval_set}/{metric}"))
        lines.append(f"final retrieval (step {retrieval['step']}, {eval_set}): nDCG@10 "
                     f"{get('ndcg@10')}, Recall@100 {get('recall@100')}, MRR@10 {get('mrr@10')}")
    if nonfinite_total:
        lines.append(f"skipped steps (NaN/inf loss or gradient): {nonfinite_total}")
    texts = os.path.join(workdir, "texts.txt")
    if not storage.exists(texts):
        storage.write_text_atomic(EXAMPLE_TEXTS, texts)
    py = shlex.quote(python_command())
    emb = "emb.npy" if storage.is_url(workdir) else os.path.join(workdir, "emb.npy")
    lines += [
        f"next (from {shlex.quote(os.getcwd())}; {texts} holds example texts, one per line):",
        f"  {py} -m mlembed_jax.encode --model={run} --input={shlex.quote(texts)} "
        f"--output={shlex.quote(emb)}",
        f"  {py} tools/export_hf.py --model={run} "
        f"--output_dir={shlex.quote(os.path.join('exports', name))}",
        f"  {py} tools/matryoshka_report.py --model={run} --heldout "
        f"--output_dir={shlex.quote(report)}",
    ]
    return "\n".join(lines)
