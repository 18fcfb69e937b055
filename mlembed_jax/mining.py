"""Hard-negative mining for your own (query, passage) pairs, with false-negative filters.

    python tools/mine_negatives.py --model=runs/demo --input=pairs/ --output_dir=raw/

Input: parquet files with string columns query and passage (one file per dataset; columns
negative_1..K of an earlier mining are replaced). Output, per input file and under its name:
query, passage, negative_1..K (hardest first): the recipe format tools/prepare_data.py reads.

Per dataset (one input file):
1. Corpus: the file's passages plus the extra corpus, deduplicated by exact text. Queries:
   its distinct query texts. Both are embedded by the model (embedding_store, through
   embedding.embed_token_ids: packed, on every local device) with each side's prefix.
2. Search: exact top-(depth + P) by cosine, blocked, on device (eval/retrieval.exact_search);
   P = the most positives one query has.
3. A row's candidates: its query's nearest corpus texts that are not one of the query's
   positives (every passage paired with that query, after whitespace normalisation, in this
   file; sentence-transformers' rule), the first `depth` of them. Filters, each candidate
   counted under the first that removes it:
     positive_variant  equal to one of the query's positives after whitespace normalisation
     query_text        equal to the query after whitespace normalisation
     duplicate         equal (normalised) to a higher-ranked candidate of the row
     rank_window       its rank among the candidates (0 = nearest) outside
                       [rank_min, rank_max)
     margin            score > s_pos - margin                     (absolute margin)
     score_ratio       score > s_pos - (1 - ratio) |s_pos|, i.e. above ratio x s_pos for a
                       positive s_pos (NV-Retriever's TopK-PercPos, ratio 0.95)
   s_pos is the score of the row's own positive: the one its loss contrasts them with.
4. Choice: the K highest-scoring survivors (sampling "top") or K of them drawn at random
   (sampling "random", seeded per dataset and row block, so reruns agree), hardest first.
5. Rows with fewer than K survivors (if_short): "drop" them; "repeat" their survivors to fill
   K columns (rows with none are dropped); or "shrink": keep every row with at least
   min_negatives and write K' = the fewest any kept row has. Fewer than the task type's
   negatives per sample (retrieval 7, clustering 9, classification 1) then needs the
   manifest's num_negatives <= K' for that dataset; the summary says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from mlembed_jax import encode as encode_lib
from mlembed_jax.cli import missing_dirs, remove_empty, writable_dir
from mlembed_jax.data.manifest import DEFAULT_NEGATIVES, load_manifest
from mlembed_jax.data.parquet_io import check_text_column, read_parquet
from mlembed_jax.data.text_encoding import choose_prefixes
from mlembed_jax.embedding_store import EmbeddingStore
from mlembed_jax.eval.retrieval import exact_search, read_beir_jsonl
from mlembed_jax.storage import write_bytes_atomic as atomic_write_bytes
from mlembed_jax.storage import write_table_atomic as atomic_write_table

FILTERS = ("positive_variant", "query_text", "duplicate", "rank_window", "margin",
           "score_ratio")
IF_SHORT = ("drop", "repeat", "shrink")
SAMPLING = ("top", "random")
HIST_BINS = np.linspace(-1.0, 1.0, 101)  # cosine scores, 0.02 wide
_ROW_BLOCK = 8192  # rows filtered at once; also the unit of the random draws


class MiningError(ValueError):
    """Settings or data the miner cannot use; the message names the thing and the fix."""


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    """negatives: K columns to write. depth: candidates per query (besides its positives).
    max_score_ratio / margin: the score filters (None = off). rank_min / rank_max: the rank
    window (rank_max None = depth). sampling: "top" | "random". seed: for "random".
    if_short: "drop" | "repeat" | "shrink"; min_negatives: rows kept by "shrink"."""

    negatives: int = 24
    depth: int = 128
    max_score_ratio: float | None = 0.95
    margin: float | None = None
    rank_min: int = 0
    rank_max: int | None = None
    sampling: str = "top"
    seed: int = 0
    if_short: str = "drop"
    min_negatives: int = 1

    def check(self) -> "MiningSettings":
        rank_max = self.depth if self.rank_max is None else self.rank_max
        problems = []
        if self.negatives < 1:
            problems.append(f"--negatives={self.negatives} must be at least 1")
        if self.depth < self.negatives:
            problems.append(f"--depth={self.depth} must be at least --negatives="
                            f"{self.negatives} (candidates to choose them from)")
        if not 0 <= self.rank_min < rank_max <= self.depth:
            problems.append(f"the rank window [--rank_min={self.rank_min}, --rank_max="
                            f"{rank_max}) must satisfy 0 <= rank_min < rank_max <= --depth="
                            f"{self.depth}")
        if self.max_score_ratio is not None and not 0 < self.max_score_ratio <= 1:
            problems.append(f"--max_score_ratio={self.max_score_ratio} must be in (0, 1] "
                            "(or none to switch the filter off)")
        if self.margin is not None and self.margin < 0:
            problems.append(f"--margin={self.margin} must be >= 0")
        if self.sampling not in SAMPLING:
            problems.append(f"--sampling={self.sampling!r} must be one of {SAMPLING}")
        if self.if_short not in IF_SHORT:
            problems.append(f"--if_short={self.if_short!r} must be one of {IF_SHORT}")
        if not 1 <= self.min_negatives <= self.negatives:
            problems.append(f"--min_negatives={self.min_negatives} must be in [1, "
                            f"--negatives={self.negatives}]")
        if problems:
            raise MiningError("; ".join(problems))
        return dataclasses.replace(self, rank_max=rank_max)


@dataclasses.dataclass(frozen=True)
class MiningJob:
    """What `run` reads and writes. inputs: parquet files or directories of them.
    output_dir: one parquet per input, under its name. corpus_files / corpus_field: extra
    candidate texts (`read_corpus`). query_prefix / document_prefix: None = the manifest
    entry's, else the model's prompt (`dataset_prefixes`). manifest: the prepare_data
    manifest ('' = none). cache_dir: embedding store ('' = none). summary_path: '' =
    OUTPUT_DIR/mining_summary.json. overwrite: replace existing outputs."""

    inputs: Sequence[str]
    output_dir: str
    corpus_files: Sequence[str] = ()
    corpus_field: str = "text"
    query_prefix: str | None = None
    document_prefix: str | None = None
    manifest: str = ""
    cache_dir: str = ""
    summary_path: str = ""
    overwrite: bool = False


@dataclasses.dataclass
class Mined:
    """One mined dataset. table: query, passage, negative_1..K' (recipe format).
    stats: the summary entry (counts per filter, rows short, scores). hist: name ->
    counts over HIST_BINS (positive, negative, removed). naive: [rows, K] corpus index of
    each row's K nearest texts before any filter other than "not a positive, not the query's
    own text" (-1 = none), for comparison with plain top-k mining; corpus: the corpus texts
    those indices point at."""

    table: pa.Table
    stats: dict
    hist: dict
    naive: np.ndarray
    corpus: list[str]


def normalize_whitespace(text: str) -> str:
    """Runs of whitespace (any Unicode space) -> one space; ends stripped."""
    return " ".join(text.split())


def _sorted_isin(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Elementwise `keys in table` for a sorted 1-D int64 table."""
    if not len(table):
        return np.zeros(keys.shape, bool)
    pos = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return table[pos] == keys


def _rng(seed: int, name: str, block: int) -> np.random.Generator:
    tag = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, tag, block])


def mine(name: str, queries: Sequence[str], passages: Sequence[str], extra_corpus: Sequence[str],
         embed_queries: Callable[[list[str]], np.ndarray],
         embed_docs: Callable[[list[str]], np.ndarray], settings: MiningSettings) -> Mined:
    """Mines K negatives for each (query, passage) row of one dataset.

    embed_queries / embed_docs: texts -> [n, m] float32, L2-normalised (the model, with each
    side's prefix). extra_corpus: more candidate texts (empty ones are skipped, counted).
    """
    s = settings.check()
    K = s.negatives
    n = len(queries)
    if n == 0 or n != len(passages):
        raise MiningError(f"{name}: need as many queries as passages, at least one "
                          f"(got {len(queries)} and {len(passages)})")
    extra = [t for t in extra_corpus if t.strip()]
    corpus = list(dict.fromkeys(list(passages) + extra))
    doc_of = {t: i for i, t in enumerate(corpus)}
    uq = list(dict.fromkeys(queries))
    uq_of = {t: i for i, t in enumerate(uq)}
    row_q = np.fromiter((uq_of[q] for q in queries), np.int64, n)
    row_pos = np.fromiter((doc_of[p] for p in passages), np.int64, n)
    row_qdoc = np.fromiter((doc_of.get(q, -1) for q in queries), np.int64, n)  # -1: not a doc

    # One id per whitespace-normalised text, shared by corpus texts and queries.
    norm_of: dict[str, int] = {}
    doc_norm = np.fromiter((norm_of.setdefault(normalize_whitespace(t), len(norm_of))
                            for t in corpus), np.int64, len(corpus))
    uq_norm = np.fromiter((norm_of.setdefault(normalize_whitespace(t), len(norm_of))
                           for t in uq), np.int64, len(uq))
    n_docs, n_norm = len(corpus), len(norm_of)
    row_qn = uq_norm[row_q]  # positives are grouped by the normalised query
    pos_pairs = np.unique(row_qn * n_docs + row_pos)
    pos_norm_pairs = np.unique(row_qn * n_norm + doc_norm[row_pos])
    max_pos = int(np.bincount(pos_pairs // n_docs).max())

    q_emb = np.asarray(embed_queries(uq), np.float32)
    d_emb = np.asarray(embed_docs(corpus), np.float32)
    k = min(s.depth + max_pos + 1, n_docs)  # + 1: the query's own text, if it is a doc
    scores, index = exact_search(q_emb, d_emb, k)  # [uq, k] best first; index -1 = none
    pos_score = np.einsum("nd,nd->n", q_emb[row_q], d_emb[row_pos])

    removed = dict.fromkeys(FILTERS, 0)
    hist = {h: np.zeros(len(HIST_BINS) - 1, np.int64) for h in ("positive", "negative",
                                                                "removed")}
    hist["positive"] += np.histogram(pos_score, HIST_BINS)[0]
    chosen = np.full((n, K), -1, np.int64)
    chosen_score = np.full((n, K), np.nan, np.float32)
    naive = np.full((n, K), -1, np.int64)
    survivors = np.zeros(n, np.int64)
    examined_total = 0
    for b, r0 in enumerate(range(0, n, _ROW_BLOCK)):
        rows = slice(r0, min(n, r0 + _ROW_BLOCK))
        cand, sc = index[row_q[rows]], scores[row_q[rows]]
        qn, ps = row_qn[rows][:, None], pos_score[rows][:, None]
        valid = cand >= 0
        is_pos = valid & _sorted_isin(qn * n_docs + cand, pos_pairs)
        cands = valid & ~is_pos
        rank = np.cumsum(cands, axis=1) - 1  # among the candidates, 0 = nearest
        examined = cands & (rank < s.depth)
        examined_total += int(examined.sum())
        # Plain top-k mining (sentence-transformers' mine_hard_negatives) skips the query's
        # own text as well as its positives.
        plain = cands & (cand != row_qdoc[rows][:, None])
        naive[rows] = _left_align(plain & (np.cumsum(plain, axis=1) <= K), cand, K, -1)

        cnorm = doc_norm[np.maximum(cand, 0)]
        masks = {
            "positive_variant": _sorted_isin(qn * n_norm + cnorm, pos_norm_pairs),
            "query_text": cnorm == qn,
            "duplicate": _later_duplicates(np.where(examined, cnorm, -1)),
            "rank_window": (rank < s.rank_min) | (rank >= s.rank_max),
            "margin": (sc > ps - s.margin) if s.margin is not None else None,
            "score_ratio": (sc > ps - (1.0 - s.max_score_ratio) * np.abs(ps)
                            if s.max_score_ratio is not None else None),
        }
        alive = examined.copy()
        for f in FILTERS:
            if masks[f] is None:
                continue
            hit = alive & masks[f]
            removed[f] += int(hit.sum())
            if f in ("positive_variant", "query_text", "duplicate", "margin", "score_ratio"):
                hist["removed"] += np.histogram(sc[hit], HIST_BINS)[0]
            alive &= ~hit
        survivors[rows] = alive.sum(1)

        if s.sampling == "top":
            pick = alive & (np.cumsum(alive, axis=1) <= K)
        else:
            draw = _rng(s.seed, name, b).random(alive.shape)
            draw[~alive] = 2.0
            kth = np.sort(draw, axis=1)[:, min(K, draw.shape[1]) - 1:min(K, draw.shape[1])]
            pick = alive & (draw <= kth)
        chosen[rows] = _left_align(pick, cand, K, -1)  # rank order = score order
        chosen_score[rows] = _left_align(pick, sc, K, np.nan)

    table, rows_info = _write_rows(queries, passages, corpus, chosen, survivors, s)
    if not rows_info["rows_out"]:
        need = {"drop": K, "repeat": 1, "shrink": s.min_negatives}[s.if_short]
        raise MiningError(f"{name}: no row keeps {need} negative(s) after the filters (most "
                          f"survivors in a row: "
                          f"{int(survivors.max())}); raise --depth, relax --max_score_ratio / "
                          "--margin / the rank window, or use --if_short=repeat or shrink")
    kept = rows_info.pop("kept")
    neg_scores = chosen_score[kept][:, :rows_info["negative_columns"]]
    hist["negative"] += np.histogram(neg_scores[np.isfinite(neg_scores)], HIST_BINS)[0]
    stats = {
        "rows_in": n, "unique_queries": len(uq), "corpus_texts": n_docs,
        "extra_corpus_texts": len(extra), "extra_corpus_skipped_empty":
            len(extra_corpus) - len(extra),
        "max_positives_per_query": max_pos,
        "candidates_examined": examined_total,
        "removed": removed,
        "survivors_per_row": _describe(survivors),
        "rows_short": int((survivors < K).sum()),
        **rows_info,
        "scores": {"positive": _describe(pos_score),
                   "negative": _describe(neg_scores[np.isfinite(neg_scores)])},
    }
    return Mined(table=table, stats=stats, hist=hist, naive=naive, corpus=corpus)


def _left_align(mask: np.ndarray, values: np.ndarray, width: int, fill) -> np.ndarray:
    """[rows, width]: each row's values where mask holds, in their order, then `fill`."""
    order = np.argsort(~mask, axis=1, kind="stable")[:, :width]
    got = np.take_along_axis(mask, order, axis=1)
    out = np.where(got, np.take_along_axis(values, order, axis=1), fill)
    if out.shape[1] < width:  # fewer candidates than columns (a small corpus)
        out = np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=fill)
    return out


def _later_duplicates(key: np.ndarray) -> np.ndarray:
    """[rows, k] bool: True where key (>= 0) equals a key earlier in its row."""
    order = np.argsort(key, axis=1, kind="stable")  # equal keys keep their rank order
    sk = np.take_along_axis(key, order, axis=1)
    dup_sorted = np.zeros(key.shape, bool)
    dup_sorted[:, 1:] = (sk[:, 1:] == sk[:, :-1]) & (sk[:, 1:] >= 0)
    out = np.zeros(key.shape, bool)
    np.put_along_axis(out, order, dup_sorted, axis=1)
    return out


def _write_rows(queries, passages, corpus, chosen, survivors, s: MiningSettings):
    """The output table under the if_short policy, and what it did."""
    K = s.negatives
    n_chosen = (chosen >= 0).sum(1)
    info = {"if_short": s.if_short}
    if s.if_short == "drop":
        kept = np.flatnonzero(n_chosen == K)
        width = K
        cols = chosen[kept]
    elif s.if_short == "repeat":
        kept = np.flatnonzero(n_chosen > 0)
        have = n_chosen[kept][:, None]
        cols = np.take_along_axis(chosen[kept], np.arange(K)[None, :] % have, axis=1)
        width = K
        info["rows_repeated"] = int((have[:, 0] < K).sum())
    else:  # shrink
        kept = np.flatnonzero(n_chosen >= s.min_negatives)
        width = int(n_chosen[kept].min()) if len(kept) else 0
        cols = chosen[kept][:, :width]
    info.update(rows_out=int(len(kept)), rows_dropped=int(len(queries) - len(kept)),
                negative_columns=width, kept=kept)
    if width < K and len(kept):
        needs = sorted(t for t, d in DEFAULT_NEGATIVES.items() if d > width)
        info["note"] = (f"only {width} negative column(s) written: a dataset of task type "
                        f"{' or '.join(needs)} needs \"num_negatives\": {width} (or fewer) in "
                        "its manifest entry" if needs else
                        f"{width} negative column(s) written")
    q = [queries[i] for i in kept]
    p = [passages[i] for i in kept]
    table = pa.table({"query": pa.array(q, pa.string()), "passage": pa.array(p, pa.string()),
                      **{f"negative_{j + 1}": pa.array([corpus[i] for i in cols[:, j]],
                                                       pa.string()) for j in range(width)}})
    return table, info


def _describe(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    if not len(x):
        return {"count": 0}
    p = np.percentile(x, [5, 50, 95])
    return {"count": int(len(x)), "mean": round(float(x.mean()), 4),
            "min": round(float(x.min()), 4), "p5": round(float(p[0]), 4),
            "p50": round(float(p[1]), 4), "p95": round(float(p[2]), 4),
            "max": round(float(x.max()), 4)}


def plot_histograms(hists: dict[str, dict], path: str) -> None:
    """One panel per dataset: positive, chosen negative and removed candidate scores."""
    import matplotlib  # slow to import; only the summary needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(hists)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
    centers = (HIST_BINS[:-1] + HIST_BINS[1:]) / 2
    width = HIST_BINS[1] - HIST_BINS[0]
    for ax, name in zip(axes[:, 0], names):
        h = hists[name]
        for key, color, label in (("removed", "tab:red", "removed by the filters"),
                                  ("negative", "tab:blue", "chosen negatives"),
                                  ("positive", "tab:green", "positives")):
            counts = np.asarray(h[key], np.float64)
            total = counts.sum()
            if total:
                ax.bar(centers, counts / total, width=width, alpha=0.5, color=color,
                       label=f"{label} ({int(total)})")
        ax.set_title(name)
        ax.set_xlabel("cosine score with the query")
        ax.set_ylabel("share")
        lo = next((centers[i] for i in range(len(centers))
                   if any(h[k][i] for k in h)), -1.0) - 0.05
        ax.set_xlim(max(-1.0, lo), 1.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(name: str, stats: dict, K: int) -> str:
    """A few lines for the terminal about one mined dataset."""
    r = stats["removed"]
    ex = max(stats["candidates_examined"], 1)
    parts = ", ".join(f"{f} {r[f]} ({100 * r[f] / ex:.1f}%)" for f in FILTERS if r[f])
    lines = [f"{name}: {stats['rows_in']} rows, {stats['unique_queries']} queries, "
             f"{stats['corpus_texts']} corpus texts; {stats['candidates_examined']} candidates"
             f", removed: {parts or 'none'}",
             f"  {stats['rows_short']} rows had fewer than {K} survivors; wrote "
             f"{stats['rows_out']} rows x {stats['negative_columns']} negatives "
             f"(--if_short={stats['if_short']}, {stats['rows_dropped']} rows dropped)"]
    sp, sn = stats["scores"]["positive"], stats["scores"]["negative"]
    if sn.get("count"):
        lines.append(f"  scores: positives median {sp['p50']:.3f}, chosen negatives median "
                     f"{sn['p50']:.3f} (max {sn['max']:.3f})")
    if "note" in stats:
        lines.append(f"  note: {stats['note']}")
    return "\n".join(lines)



# --------------------------------------------------------------------------- files and model

def list_inputs(paths: Sequence[str]) -> dict[str, str]:
    """Dataset name (file stem) -> parquet path, for files and directories of *.parquet."""
    found: dict[str, str] = {}
    for p in paths:
        if os.path.isdir(p):
            files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".parquet"))
            if not files:
                raise MiningError(f"--input {p!r}: a directory with no .parquet file")
        elif os.path.isfile(p) and p.endswith(".parquet"):
            files = [p]
        else:
            raise MiningError(f"--input {p!r}: not a .parquet file or a directory of them")
        for f in files:
            name = os.path.basename(f)[:-len(".parquet")]
            if name in found:
                raise MiningError(f"two inputs are both named {name!r} ({found[name]} and {f});"
                                  " output files are named after their input, rename one")
            found[name] = f
    return found


def read_pairs(path: str) -> tuple[list[str], list[str]]:
    """The query and passage columns of a pairs file; errors name the file, row and column."""
    table = read_parquet(path)
    if table.num_rows == 0:
        raise MiningError(f"{path}: no rows")
    return check_text_column(table, "query", path), check_text_column(table, "passage", path)


def read_corpus(path: str, field: str = "text") -> list[str]:
    """Extra candidate texts: .parquet (column `field`), .jsonl (a BEIR corpus: title + " " +
    text, as tools/eval_retrieval.py reads it) or any other file (one text per line)."""
    if not os.path.isfile(path):
        raise MiningError(f"--corpus {path!r} does not exist")
    if path.endswith(".parquet"):
        table = read_parquet(path)
        if field not in table.column_names:
            raise MiningError(f"{path}: no column {field!r} (columns: {table.column_names}); "
                              "choose one with --corpus_field")
        return [t for t in table.column(field).to_pylist() if isinstance(t, str)]
    if path.endswith(".jsonl"):
        return [text for _, text in read_beir_jsonl(path, "document", need_title=True)]
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def dataset_prefixes(name: str, model, manifest: dict | None, query_prefix: str | None,
                     document_prefix: str | None) -> dict[str, str]:
    """The instruction prefixes to embed a dataset with: the flags, else its manifest entry,
    else what the model knows for that dataset name (or its only / default prompts)."""
    return choose_prefixes(model.prefixes, name, (manifest or {}).get(name), query_prefix,
                           document_prefix)


def run(job: MiningJob, settings: MiningSettings, model: encode_lib.ModelSettings,
        point: encode_lib.EncodeSettings = encode_lib.EncodeSettings(), *, log=print) -> dict:
    """Mines every input file of `job` with the model at `point`; writes one recipe-format
    parquet per input into job.output_dir, the summary JSON and its histogram PNG. Returns
    the summary."""
    s = settings.check()
    files = list_inputs(job.inputs)
    out_paths = {n: os.path.join(job.output_dir, f"{n}.parquet") for n in files}
    for n, out in out_paths.items():
        if os.path.abspath(out) == os.path.abspath(files[n]):
            raise MiningError(f"--output_dir {job.output_dir!r} would overwrite the input "
                              f"{out}; write to another directory")
        if os.path.exists(out) and not job.overwrite:
            raise MiningError(f"{out} exists; pass --overwrite to replace it")
    specs = load_manifest(job.manifest) if job.manifest else None
    extra: list[str] = []
    for f in job.corpus_files:
        extra += read_corpus(f, job.corpus_field)
    pairs = {n: read_pairs(p) for n, p in files.items()}  # all checked before the model loads
    # Writable before any work; what this makes is taken back if mining then fails.
    made = missing_dirs(job.output_dir)
    writable_dir(job.output_dir, "--output_dir")
    existed = {p for p in out_paths.values() if os.path.lexists(p)}
    try:
        return _run(job, s, model, point, (files, pairs, extra, specs, out_paths), log)
    except BaseException:
        # A failed run leaves no file of its own: the outputs of the datasets mined before
        # the failure are removed (files it replaced under --overwrite are gone already).
        for p in out_paths.values():
            for f in ([p] if p not in existed else []) + [f"{p}.tmp-{os.getpid()}"]:
                if os.path.isfile(f):
                    os.remove(f)
        remove_empty(made)
        raise


def _run(job: MiningJob, s: MiningSettings, model_settings, point, read, log) -> dict:
    """`run` after the checks; read: (files, pairs, extra corpus, manifest, output paths)."""
    files, pairs, extra, specs, out_paths = read
    t0 = time.time()
    model = model_settings.load()
    rank, exit, dim = model.check(point.rank, point.exit, point.dim, point.allow_untrained)
    store = EmbeddingStore(job.cache_dir or None, model, rank=rank, exit=exit, dim=dim,
                           allow_untrained=point.allow_untrained)
    load_s = time.time() - t0
    timing = {"load_s": load_s, "encode_s": 0.0, "encoded_texts": 0}

    def embedder(prefix: str, desc: str):
        def embed(texts: list[str]) -> np.ndarray:
            t = time.time()
            before = len(store)
            emb = store.embed(model.tokenize(texts, prefix), batch_tokens=point.batch_tokens,
                              progress=point.progress, desc=desc)
            timing["encode_s"] += time.time() - t
            timing["encoded_texts"] += len(store) - before
            return emb
        return embed

    os.makedirs(job.output_dir, exist_ok=True)
    summary = {"model": os.path.abspath(model_settings.path), "step": model.step,
               "point": {"rank": rank, "exit": exit, "dim": dim},
               "settings": dataclasses.asdict(s), "corpus_files": list(job.corpus_files),
               "datasets": {}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    hists = {}
    for name, (queries, passages) in pairs.items():
        prefixes = dataset_prefixes(name, model, specs, job.query_prefix, job.document_prefix)
        mined = mine(name, queries, passages, extra,
                     embedder(prefixes["query"], f"{name} queries"),
                     embedder(prefixes["document"], f"{name} corpus"), s)
        atomic_write_table(mined.table, out_paths[name])
        mined.stats.update(prefixes=prefixes, input=files[name], output=out_paths[name])
        mined.stats["histogram"] = {"bins": HIST_BINS.round(4).tolist(),
                                    **{k: v.tolist() for k, v in mined.hist.items()}}
        summary["datasets"][name] = mined.stats
        hists[name] = mined.hist
        log(describe(name, mined.stats, s.negatives))
    timing["total_s"] = time.time() - t0
    timing["encode_texts_per_s"] = (timing["encoded_texts"] / timing["encode_s"]
                                    if timing["encode_s"] else None)
    summary["timing"] = timing
    summary_path = job.summary_path or os.path.join(job.output_dir, "mining_summary.json")
    png = os.path.splitext(summary_path)[0] + ".png"
    summary["histogram_png"] = png
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    plot_histograms(hists, png)
    atomic_write_bytes(json.dumps(summary, indent=1).encode(), summary_path)
    log(f"wrote {len(pairs)} dataset(s) to {job.output_dir}; summary {summary_path}, histogram "
        f"{png}; encoded {timing['encoded_texts']} texts in {timing['encode_s']:.1f}s")
    return summary
