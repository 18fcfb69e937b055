"""What a training run tells its user: a short config summary at the start (the full config
goes to WORKDIR/run_config.json; not config.json, which marks a Hugging Face directory) and,
at the end, where the run is, its final figures and the commands to run on it next."""

from __future__ import annotations

import json
import os
import shlex

from mlembed_jax import storage
from mlembed_jax.config import config_json
from mlembed_jax.grad_cache import resolve_chunks


def write_config(config, workdir: str) -> str:
    """WORKDIR/run_config.json (written atomically); returns its path."""
    path = os.path.join(workdir, "run_config.json")
    storage.write_text_atomic(json.dumps(config_json(config), indent=1), path)
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
        f"{d.rows_per_pack} rows x {d.seq_len} tokens, {d.samples_per_pack} samples each",
        f"optim: AdamW lr {o.lr:g} -> {o.min_lr:g} ({o.schedule}, {o.warmup_steps} warmup "
        f"steps), wd {o.weight_decay:g}, clip {o.grad_clip:g}; loss: temperature "
        f"{ls.temperature:g}, MRL dims down to {ls.mrl_min_dim}{kd}",
        f"train: {length}, seed {t.seed}; log every {t.log_every}, validate every "
        f"{t.eval_every}, checkpoint every {t.checkpoint_every} (keep {t.keep_checkpoints})",
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
    lines += [
        "next:",
        f"  python -m mlembed_jax.encode --model={run} --input=texts.txt --output=emb.npy",
        f"  python tools/export_hf.py --checkpoint {run} --out exports/{shlex.quote(name)}",
        f"  python tools/matryoshka_report.py --model={run} --heldout "
        f"--out_dir={shlex.quote(report)}",
    ]
    return "\n".join(lines)
