"""The 3D Matryoshka trade-off of one checkpoint: quality over MEL rank x MLL exit x MRL dim.

    python tools/matryoshka_report.py --model=runs/demo --heldout --output_dir=reports/demo
    python tools/matryoshka_report.py --model=runs/0.6b --beir_dir=/data/beir/scifact \
        --output_dir=reports/scifact [--ranks=64,256,512] [--exits=4,8,28] [--dims=64,256,1024]
    python tools/matryoshka_report.py --model=runs/0.6b --mteb_tasks=SciFact,STS22 \
        --output_dir=reports/mteb

Evaluates every grid point (defaults: the model's trained ranks, exits and dims) and writes
  OUT/matryoshka.json  one row per (rank, exit, dim): nDCG@10, Recall@100, MRR@10, the
                       parameter count of the model at that (rank, exit) and the bytes of
                       one embedding at that dim (float32)
  OUT/matryoshka.png   heatmaps of nDCG@10 over exit x dim, one per rank; nDCG@10 against
                       parameter count (full dim); nDCG@10 against embedding bytes (full rank)
Cost: one forward pass per rank (all exits come out of one pass of the deepest one), and the
dims are prefixes of the same embeddings, so the grid costs len(ranks) passes + searches.

--mteb_tasks: MTEB tasks (names or local task directories, see tools/eval_mteb.py) are the
score instead: each row holds every task's main score ("mteb") and their mean ("mteb_mean",
the plotted value); prompts as in tools/eval_mteb.py (--mteb_prompts for a prompts file).

Parameter count at (r, e): MEL in efficiency mode (U[:, :r] and V[:r] kept as two factors:
vocab*r + r*d), plus e decoder layers and the final norm. A model without MEL counts its
plain vocab*d table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from mlembed_jax import cli
from mlembed_jax.cli import missing_dirs, remove_empty, writable_dir
from mlembed_jax.encode import EncodeSettings, normalize
from mlembed_jax.eval import retrieval as rev

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def point_params(model, rank: int | None, exit: int) -> int:
    """Parameters of the model cut to `exit` layers at MEL rank `rank` (efficiency mode)."""
    import jax

    cfg = model.cfg
    layer_leaves = jax.tree_util.tree_leaves(model.params["layers"])
    per_layer = sum(int(np.prod(x.shape[1:])) for x in layer_leaves)
    if cfg.mel:
        r = cfg.mel_r_max if rank is None else rank
        embed = cfg.vocab_size * r + r * cfg.hidden_size
    else:
        embed = cfg.vocab_size * cfg.hidden_size
    return int(embed + exit * per_layer + cfg.hidden_size)  # + the final norm


def run_grid(model, sets, ranks, exits, dims, *,
             allow_untrained=EncodeSettings.allow_untrained,
             batch_tokens=EncodeSettings.batch_tokens,
             progress=EncodeSettings.progress) -> list[dict]:
    """Metrics (mean over `sets`) of every (rank, exit, dim). Returns rows, ranks outermost."""
    rows = []
    for r in ranks:
        per_set = []
        for s in sets:
            kw = dict(rank=r, allow_untrained=allow_untrained, batch_tokens=batch_tokens,
                      progress=progress)
            q = model.encode_exits(s.queries, exits, **kw)
            d = model.encode_exits(s.docs, exits, **kw)
            per_set.append((s, q, d))
        for e in exits:
            for m in dims:
                model.check(r, e, m, allow_untrained)
                vals = [rev.evaluate_embeddings(s, normalize(q[e], m), normalize(d[e], m))
                        for s, q, d in per_set]
                row = {"rank": r, "exit": e, "dim": m}
                row.update({k: float(np.mean([v[k] for v in vals])) for k in METRICS})
                row["params"] = point_params(model, r, e)
                row["embedding_bytes"] = 4 * m
                rows.append(row)
    return rows


def plot(rows: list[dict], path: str, title: str, metric: str = "ndcg@10") -> None:
    """Writes the heatmaps and the two trade-off panels of `metric` to one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in rows}, key=lambda x: -1 if x is None else x)
    exits = sorted({r["exit"] for r in rows})
    dims = sorted({r["dim"] for r in rows})
    value = {(r["rank"], r["exit"], r["dim"]): r[metric] for r in rows}
    vmin, vmax = min(value.values()), max(value.values())
    ncols = max(len(ranks), 2)
    fig = plt.figure(figsize=(3.6 * ncols, 7.6), layout="constrained")
    grid = fig.add_gridspec(2, ncols * 2)
    image = None
    for i, r in enumerate(ranks):
        ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
        z = np.array([[value[(r, e, m)] for m in dims] for e in exits])
        image = ax.imshow(z, origin="lower", aspect="auto", cmap="viridis", vmin=vmin,
                          vmax=vmax)
        ax.set_xticks(range(len(dims)), [str(m) for m in dims])
        ax.set_yticks(range(len(exits)), [str(e) for e in exits])
        ax.set_xlabel("MRL dim")
        ax.set_ylabel("MLL exit (layers)")
        ax.set_title(f"MEL rank {r if r is not None else 'full'}")
        for y in range(len(exits)):
            for x in range(len(dims)):
                v = z[y, x]
                ax.text(x, y, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")
    label = {"ndcg@10": "nDCG@10"}.get(metric, metric)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label=label, location="right")

    half = ncols
    ax = fig.add_subplot(grid[1, :half])
    full_dim = max(dims)
    for r in ranks:
        pts = sorted((row["params"], row[metric], row["exit"]) for row in rows
                     if row["rank"] == r and row["dim"] == full_dim)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                label=f"rank {r if r is not None else 'full'}")
        for p, v, e in pts:
            ax.annotate(f"{e}L", (p, v), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (MEL factors kept, layers up to the exit)")
    ax.set_ylabel(f"{label} (dim {full_dim})")
    ax.set_title("quality vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[1, half:])
    top = ranks[-1]
    for e in exits:
        pts = sorted((row["embedding_bytes"], row[metric]) for row in rows
                     if row["rank"] == top and row["exit"] == e)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"exit {e}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per embedding (float32)")
    ax.set_ylabel(f"{label} (rank {top if top is not None else 'full'})")
    ax.set_title("quality vs index size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- MTEB as the score

def run_mteb_grid(model, tasks, ranks, exits, dims, *, prompts_file="", allow_untrained=False,
                  batch_tokens=16384, progress=True) -> list[dict]:
    """MTEB main scores of every (rank, exit, dim): row["mteb"] = {task: main score},
    row["mteb_mean"] their mean. Per rank, each text list is encoded once for all exits and
    the dims are prefixes of those embeddings, as in run_grid; mteb scores every point."""
    import mteb

    from mlembed_jax.eval import mteb_adapter as ma

    prompts = ma.TaskPrompts.of(model, prompts_file)
    rows = []
    for r in ranks:
        shared: dict = {}  # this rank's embeddings, all exits, full dim
        for e in exits:
            for m in dims:
                encoder = ma.MTEBEncoder(model, ma.Point(r, e, m), prompts,
                                         allow_untrained=allow_untrained,
                                         batch_tokens=batch_tokens, progress=progress,
                                         shared=shared, grid_exits=tuple(exits))
                result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=False)
                if result.exceptions:
                    raise ma.MTEBError(f"rank {r}, exit {e}, dim {m}: {result.exceptions[0]}")
                scores = {t.task_name: float(t.get_score()) for t in result.task_results}
                rows.append({"rank": r, "exit": e, "dim": m, "mteb": scores,
                             "mteb_mean": float(np.mean(list(scores.values()))),
                             "params": point_params(model, r, e), "embedding_bytes": 4 * m})
    return rows


def mteb_main(a) -> int:
    """The report scored by MTEB tasks (--mteb_tasks) instead of a retrieval set."""
    from mlembed_jax.eval import mteb_tasks as mt

    if a.beir_dir or a.heldout:
        print("error: --mteb_tasks replaces --beir_dir/--heldout; give one of them",
              file=sys.stderr)
        return 2
    made = missing_dirs(a.output_dir)
    try:
        writable_dir(a.output_dir, "--output_dir")
        tasks = mt.resolve_tasks(a.mteb_tasks, "")
        model = cli.model_settings(a).load()
        ranks = a.ranks or (list(model.ranks) if model.cfg.mel else [None])
        exits = a.exits or list(model.exits)
        dims = a.dims or sorted(model.dims)
        for r in ranks:  # every value checked up front, before any download or encoding
            for e in exits:
                for m in dims:
                    model.check(r, e, m, a.allow_untrained)
        mt.load_task_data(tasks)
        t0 = time.time()
        rows = run_mteb_grid(model, tasks, ranks, exits, dims, prompts_file=a.mteb_prompts,
                             allow_untrained=a.allow_untrained, batch_tokens=a.batch_tokens,
                             progress=not a.quiet)
    except (ValueError, OSError) as e:  # MTEBError, EncodeError, CheckpointError
        remove_empty(made)
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [t.metadata.name for t in tasks]
    out = {"model": os.path.abspath(a.model), "step": model.step, "mteb_tasks": names,
           "metrics": ["mteb_mean"], "ranks": ranks, "exits": exits, "dims": dims,
           "grid": rows, "seconds": time.time() - t0}
    json_path, png_path = _write_report(a, model, out, f"MTEB {', '.join(names)}", "mteb_mean")
    full = max(rows, key=lambda r: (r["params"], r["dim"]))
    print(f"{len(rows)} points on MTEB {', '.join(names)}; full model mean main score "
          f"{full['mteb_mean']:.4f}; wrote {json_path} and {png_path}")
    return 0


def _write_report(a, model, out: dict, scored_on: str, metric: str | None) -> tuple[str, str]:
    """Writes OUT/matryoshka.json and .png (and --png); returns their paths."""
    json_path = os.path.join(a.output_dir, "matryoshka.json")
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    png_path = os.path.join(a.output_dir, "matryoshka.png")
    step = f" step {model.step}" if model.step is not None else ""
    title = f"{os.path.basename(os.path.normpath(a.model))}{step} on {scored_on}"
    plot(out["grid"], png_path, title, **({"metric": metric} if metric else {}))
    if a.png:
        os.makedirs(os.path.dirname(os.path.abspath(a.png)), exist_ok=True)
        shutil.copyfile(png_path, a.png)
    return json_path, png_path


def _int_list(text: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_flags(ap)
    cli.add_eval_set_flags(ap)
    cli.add_output_flag(ap, directory=True, aliases=("--out_dir",),
                        help="where matryoshka.json/.png go")
    ap.add_argument("--png", default="", help="also copy the plot here (e.g. docs/x.png)")
    ap.add_argument("--ranks", type=_int_list, default=None, help="default: trained ranks")
    ap.add_argument("--exits", type=_int_list, default=None, help="default: trained exits")
    ap.add_argument("--dims", type=_int_list, default=None, help="default: trained MRL dims")
    cli.add_untrained_flag(ap)
    ap.add_argument("--mteb_tasks", default="", help="score with these MTEB tasks (names or "
                    "local task directories) instead of --beir_dir/--heldout")
    ap.add_argument("--mteb_prompts", default="", help="with --mteb_tasks: JSON prompts file "
                    "(tools/eval_mteb.py --prompts)")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.mteb_tasks:
        return mteb_main(a)
    made = missing_dirs(a.output_dir)
    try:
        writable_dir(a.output_dir, "--output_dir")
        model, sets = cli.load_model_and_sets(a)
        ranks = a.ranks or (list(model.ranks) if model.cfg.mel else [None])
        exits = a.exits or list(model.exits)
        dims = a.dims or sorted(model.dims)
        for r in ranks:  # every value checked up front, before any encoding
            for e in exits:
                for m in dims:
                    model.check(r, e, m, a.allow_untrained)
        t0 = time.time()
        point = cli.encode_settings(a)
        rows = run_grid(model, sets, ranks, exits, dims,
                        allow_untrained=point.allow_untrained,
                        batch_tokens=point.batch_tokens, progress=point.progress)
    except (ValueError, OSError) as e:  # EncodeError (NaN embeddings too), CheckpointError
        remove_empty(made)
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ", ".join(s.name for s in sets)
    out = {"model": os.path.abspath(a.model), "step": model.step,
           "sets": [{"name": s.name, **{k: v for k, v in s.info.items()
                                        if isinstance(v, (int, float, str))}} for s in sets],
           "metrics": list(METRICS), "ranks": ranks, "exits": exits, "dims": dims,
           "grid": rows, "seconds": time.time() - t0}
    os.makedirs(a.output_dir, exist_ok=True)
    json_path, png_path = _write_report(a, model, out, names, None)
    full = max(rows, key=lambda r: (r["params"], r["dim"]))
    print(f"{len(rows)} points on {names}; full model nDCG@10 {full['ndcg@10']:.4f}; "
          f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
