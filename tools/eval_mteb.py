"""MTEB scores of a model at one or more (MEL rank, MLL exit, MRL dim) points.

    python tools/eval_mteb.py --model=runs/demo --tasks=SciFact,STS22 --points=r8:e2:d16,full
    python tools/eval_mteb.py --model=runs/0.6b --benchmark="MTEB(Multilingual, v2)" \
        --points=full,d256 --output_dir=mteb_results
    python tools/eval_mteb.py --model=runs/demo --tasks=tasks/cldr_names_retrieval   # local

--model: a training workdir, WORKDIR/checkpoints/<step>, or an HF/exported directory.
--tasks: mteb task names and/or local task directories (mlembed_jax/eval/mteb_tasks.py: a
BEIR-layout retrieval set, or an STS test.jsonl). --benchmark: an mteb benchmark's tasks.
--points: comma-separated points, each "full" or parts r<rank>:e<exit>:d<dim> (a part left
out is the full model's); each must be a trained point unless --allow_untrained.
--prompts FILE: JSON of mteb prompt keys ("SciFact-query", "Retrieval-document", ...) ->
prompt; otherwise the training manifest's prefixes per task type, an export's own prompts,
or the paper's "Instruct: {task instruction}\\nQuery:" on queries (see eval/mteb_adapter.py);
--prompts=instruct: that instruction for every task.

Writes, under --output_dir (default mteb_results):
  results/<name>-<point>/<revision>/<Task>.json   mteb's own result files (one model name
      per point, e.g. mlembed_jax__demo-r8-e2-d16/step500/SciFact.json; the revision is the
      checkpoint step), which mteb.ResultCache and the leaderboard tooling read
  summary.json, summary.md   main score of every task at every point, and the prompts used
Task data of mteb tasks comes from the Hugging Face Hub when first used (then from the local
datasets cache); every task's data is loaded before any encoding starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mlembed_jax import cli, storage
from mlembed_jax import encode as encode_lib
from mlembed_jax.cli import missing_dirs, remove_empty, writable_dir
from mlembed_jax.eval import mteb_adapter as ma
from mlembed_jax.eval import mteb_tasks as mt


def evaluate_points(model, tasks, points, *, prompts_file="", name=None, output_dir=None,
                    allow_untrained=False, batch_tokens=encode_lib.DEFAULT_BATCH_TOKENS,
                    overwrite=False, progress=True) -> tuple[list[dict], dict]:
    """Runs mteb.evaluate for every point. Returns (rows, prompts used): a row per (point,
    task) with main_score and the result file's path (None without output_dir)."""
    import mteb

    resolved = ma.resolve_points(model, points, allow_untrained)  # all checked up front
    prompts = ma.TaskPrompts.of(model, prompts_file)
    cache = mteb.ResultCache(cache_path=output_dir) if output_dir else None
    rows = []
    for point, (r, e, d) in resolved:
        enc = ma.MTEBEncoder(model, ma.Point(r, e, d), prompts, name=name,
                             allow_untrained=allow_untrained, batch_tokens=batch_tokens,
                             progress=progress)
        result = mteb.evaluate(enc, tasks, cache=cache, show_progress_bar=progress,
                               overwrite_strategy="always" if overwrite else "only-missing")
        if result.exceptions:
            raise ma.MTEBError(f"point {point.text}: {result.exceptions[0]}")
        for tr in result.task_results:
            path = (str(cache.get_task_result_path(tr.task_name, enc.mteb_model_meta))
                    if cache else None)
            rows.append({"point": point.text, "rank": r, "exit": e, "dim": d,
                         "model_name": enc.mteb_model_meta.name,
                         "revision": enc.mteb_model_meta.revision, "task": tr.task_name,
                         "main_score": float(tr.get_score()), "result_file": path})
    used = {f"{task}/{pt or 'symmetric'}": {"prompt": p, "source": s}
            for (task, pt), (p, s) in sorted(prompts.used.items(), key=str)}
    return rows, used


def summary_markdown(rows: list[dict]) -> str:
    """Points down, tasks across, main scores (x100, as the leaderboard shows them)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    points = list(dict.fromkeys((r["point"], r["model_name"]) for r in rows))
    score = {(r["model_name"], r["task"]): r["main_score"] for r in rows}
    lines = ["| point | model name | " + " | ".join(tasks) + " | mean |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for p, m in points:
        vals = [score[(m, t)] for t in tasks]
        lines.append(f"| {p} | {m} | " + " | ".join(f"{100 * v:.2f}" for v in vals)
                     + f" | {100 * sum(vals) / len(vals):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_flags(ap)
    ap.add_argument("--tasks", default="", help="comma-separated mteb task names and/or local "
                    "task directories")
    ap.add_argument("--benchmark", default="", help="an mteb benchmark name, e.g. "
                    "'MTEB(Multilingual, v2)'")
    ap.add_argument("--points", default="full", help="e.g. r8:e2:d16,full (default: full)")
    ap.add_argument("--prompts", default="", help="JSON file: mteb prompt key -> prompt; "
                    "'instruct': every task's instruction, not the manifest's prefixes")
    ap.add_argument("--output_dir", default="mteb_results")
    ap.add_argument("--name", default=None, help="mteb model name (default mlembed_jax/<run "
                    "directory>); the point is appended")
    ap.add_argument("--overwrite", action="store_true",
                    help="rerun tasks whose result files exist (default: keep them)")
    cli.add_untrained_flag(ap)
    a = ap.parse_args(argv)
    if storage.is_url(a.output_dir):  # mteb's ResultCache is pathlib-only
        print(f"error: --output_dir {a.output_dir!r} must be a local directory (mteb writes its "
              "result files there); copy them to the bucket afterwards", file=sys.stderr)
        return 2
    made = missing_dirs(a.output_dir)
    try:
        writable_dir(a.output_dir, "--output_dir")
        points = ma.parse_points(a.points)
        tasks = mt.resolve_tasks(a.tasks, a.benchmark)
        if a.prompts and a.prompts != ma.INSTRUCT:
            ma.read_prompts_file(a.prompts)
        model = cli.model_settings(a).load()
        ma.resolve_points(model, points, a.allow_untrained)
        mt.load_task_data(tasks)
        t0 = time.time()
        rows, used = evaluate_points(model, tasks, points, prompts_file=a.prompts, name=a.name,
                                     output_dir=a.output_dir,
                                     allow_untrained=a.allow_untrained,
                                     batch_tokens=a.batch_tokens, overwrite=a.overwrite,
                                     progress=not a.quiet)
    except (ValueError, OSError) as e:  # MTEBError, EncodeError, CheckpointError, data errors
        remove_empty(made)
        print(f"error: {e}", file=sys.stderr)
        return 2
    import mteb

    out = {"model": os.path.abspath(a.model), "step": model.step,
           "mteb_version": mteb.__version__, "rows": rows, "prompts": used,
           "seconds": time.time() - t0, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    storage.write_text_atomic(json.dumps(out, indent=1), os.path.join(a.output_dir,
                                                                      "summary.json"))
    table = summary_markdown(rows)
    storage.write_text_atomic(table, os.path.join(a.output_dir, "summary.md"))
    print(table, end="")
    print(f"wrote {len(rows)} results under {os.path.join(a.output_dir, 'results')} and "
          f"{os.path.join(a.output_dir, 'summary.md')} (.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
