"""Retrieval evaluation inside the training loop, on a configured local set.

    evaluator = make_periodic_evaluator(config)  # None unless eval.retrieval_every > 0
    ...
    if evaluator and due(step, evaluator.every, total_steps):
        writer.write(step, evaluator(state.params, step))

Settings live in the config's `eval` section (see config.base_config): a BEIR-layout
directory (eval.beir_dir) and/or the run's own held-out split (eval.heldout), one
(rank, exit, dim) point, and optional query/corpus caps. Everything slow and fixed is done
once, here: loading, tokenising (exactly as training does), checking the point against the
model. Each call then only embeds and searches. It runs on the params as the train state
holds them, on their mesh: each forward holds one pack per shard of the batch axes of the
run's rules table (embedding.embed_token_ids).
"""

from __future__ import annotations

import time
from typing import Callable

from mlembed_jax.config import ConfigError
from mlembed_jax.data.prepared import training_text
from mlembed_jax.data.text_encoding import TokenizerError, encode_texts, load_tokenizer
from mlembed_jax.embedding import embed_token_ids, normalize
from mlembed_jax.eval import retrieval as rev
from mlembed_jax.model.qwen3 import EncoderConfig
from mlembed_jax.recipe import TrainedPoints, resolve_point


def _eval_settings(config):
    """The eval section with -1 resolved to None (= the full model)."""
    e = config.eval
    unset = (lambda v: None if int(v) < 0 else int(v))
    return e, unset(e.rank), unset(e.exit), unset(e.dim)


class RetrievalEvaluator:
    """callable(params, step) -> {"eval/<set>/<metric>": float, ...}: embeds every set with
    `params` at the configured point and searches it."""

    name = "eval"  # the metrics prefix
    at_start = False  # not at step 0: a random model's retrieval says nothing
    to_params = None  # LoRA: adapters -> merged params, once per call

    def __init__(self, every: int, sets: list, point: dict,
                 embed: Callable[[object, object], object]):
        self.every, self.sets, self.point, self._embed = every, sets, point, embed

    def __call__(self, params, step: int) -> dict:
        del step  # the caller logs under its own step
        t0 = time.time()
        if self.to_params is not None:
            params = self.to_params(params)
        out, sums = {}, {}
        for s in self.sets:
            m = rev.evaluate_embeddings(s, self._embed(params, s.queries),
                                        self._embed(params, s.docs))
            for k in ("ndcg@10", "recall@100", "mrr@10"):
                out[f"eval/{s.name}/{k}"] = float(m[k])
                sums[k] = sums.get(k, 0.0) + float(m[k])
        if len(self.sets) > 1:
            out.update({f"eval/{k}": v / len(self.sets) for k, v in sums.items()})
        out["eval/seconds"] = time.time() - t0
        return out


def make_periodic_evaluator(config, to_params: Callable | None = None
                            ) -> RetrievalEvaluator | None:
    """The retrieval evaluator of a run, or None when eval.retrieval_every <= 0 or the config
    has no eval section.

    Metrics per set: ndcg@10, recall@100, mrr@10 (eval/retrieval.py), plus eval/seconds.
    With several sets, eval/<metric> is their mean. Raises ConfigError for settings the
    model or the data cannot serve (unknown rank/exit/dim, missing BEIR directory...),
    so a bad setting fails before training starts rather than at the first evaluation.
    to_params: maps what the evaluator is called with to the params it embeds with (LoRA:
    adapters -> the merged weights); None: the params themselves.
    """
    if "eval" not in config or int(config.eval.retrieval_every) <= 0:
        return None
    e, rank, exit, dim = _eval_settings(config)
    if not e.beir_dir and not e.heldout:
        raise ConfigError("eval.retrieval_every > 0 needs something to evaluate: set "
                          "eval.beir_dir to a BEIR-layout directory and/or eval.heldout=True")
    cfg = EncoderConfig.from_config(config.model)
    check = resolve_point(TrainedPoints.of(cfg, int(config.loss.mrl_min_dim)), rank, exit, dim)
    problems = check.problems(bool(e.allow_untrained))
    if problems:
        raise ConfigError(f"eval.rank/exit/dim: {'; '.join(problems)}"
                          + ("" if e.allow_untrained or not check.untrained else
                             "; set eval.allow_untrained=True to evaluate a point the loss "
                             "never trained"))
    rank, exit, dim = check.point.rank, check.point.exit, check.point.dim

    sets = []
    try:
        if e.heldout:
            sets += rev.heldout_sets(config)
        if e.beir_dir:
            sets.append(_beir_set(config, e))
    except (rev.RetrievalDataError, TokenizerError, FileNotFoundError) as err:
        raise ConfigError(f"eval: {err}") from None
    if e.heldout and int(e.max_queries) > 0:  # the same cap for the held-out sets
        sets = [rev.cap_queries(s, int(e.max_queries), int(e.seed)) for s in sets]

    batch_tokens = int(e.batch_tokens)
    rules = config.mesh.logical_axis_rules

    def embed(params, ids):
        # On the training mesh the params live on: one pack per shard of its batch axes.
        pooled = embed_token_ids(params, cfg, ids, (exit,), rank=rank, batch_tokens=batch_tokens,
                                 rules=rules)
        return normalize(pooled[0], dim)

    ev = RetrievalEvaluator(int(e.retrieval_every), sets,
                            {"rank": rank, "exit": exit, "dim": dim}, embed)
    ev.to_params = to_params
    return ev


def _beir_set(config, e) -> "rev.RetrievalSet":
    """The configured BEIR set, tokenised as training tokenised its texts."""
    text = training_text(config)
    tok_dir = e.tokenizer_dir or text.tokenizer_dir
    if not tok_dir:
        raise TokenizerError(text.tokenizer_not_found("set eval.tokenizer_dir"))
    tokenizer = load_tokenizer(tok_dir)
    beir = rev.load_beir(e.beir_dir, e.split, max_queries=int(e.max_queries),
                         max_corpus=int(e.max_corpus), seed=int(e.seed))
    note = rev.describe_load(beir.info)
    if note:
        print(f"eval set {e.beir_dir}: {note}", flush=True)
    return rev.tokenize_set(
        beir, lambda texts, prefix: encode_texts(tokenizer, [prefix + t for t in texts],
                                                 text.max_seq_length),
        e.query_prefix, e.document_prefix)
