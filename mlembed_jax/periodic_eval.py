"""Retrieval evaluation inside the training loop, on a configured local set.

    evaluator = make_periodic_evaluator(config)        # None unless eval.every > 0
    ...
    if evaluator and step % config.eval.every == 0:
        writer.write(step, evaluator(state.params, step))

Settings live in the config's `eval` section (see config.base_config): a BEIR-layout
directory (eval.beir_dir) and/or the run's own held-out split (eval.heldout), one
(rank, exit, dim) point, and optional query/corpus caps. Everything slow and fixed is done
once, here: loading, tokenising (exactly as training does), checking the point against the
model. Each call then only embeds and searches. It runs on the params as the train state
holds them (device arrays, any sharding); the model's activation constraints are switched
off for it, so it needs no batch geometry of its own.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from mlembed_jax.config import ConfigError


def _eval_settings(config):
    """The eval section with -1 resolved to None (= the full model)."""
    e = config.eval
    unset = (lambda v: None if int(v) < 0 else int(v))
    return e, unset(e.rank), unset(e.exit), unset(e.dim)


def make_periodic_evaluator(config) -> Callable[[object, int], dict] | None:
    """A callable(params, step) -> {"eval/<set>/<metric>": float, ...}, or None when
    eval.every <= 0 or the config has no eval section.

    Metrics per set: ndcg@10, recall@100, mrr@10 (retrieval_eval), plus eval/seconds.
    With several sets, eval/<metric> is their mean. Raises ConfigError for settings the
    model or the data cannot serve (unknown rank/exit/dim, missing BEIR directory...),
    so a bad setting fails before training starts rather than at the first evaluation.
    """
    if "eval" not in config or int(config.eval.every) <= 0:
        return None
    from mlembed_jax import retrieval_eval as rev
    from mlembed_jax.encode import EncodeError, Encoder, _training_tokenizer
    from mlembed_jax.model.qwen3 import EncoderConfig

    e, rank, exit, dim = _eval_settings(config)
    if not e.beir_dir and not e.heldout:
        raise ConfigError("eval.every > 0 needs something to evaluate: set eval.beir_dir to a "
                          "BEIR-layout directory and/or eval.heldout=True")
    cfg = EncoderConfig.from_config(config.model)
    mrl_min = int(config.loss.mrl_min_dim)
    base = Encoder(params=None, cfg=cfg, mrl_min_dim=mrl_min)
    try:
        rank, exit, dim = base.check(rank, exit, dim, bool(e.allow_untrained))
    except EncodeError as err:
        raise ConfigError(f"eval.rank/exit/dim: {err}") from None

    sets = []
    try:
        if e.heldout:
            sets += rev.heldout_sets(config)
        if e.beir_dir:
            tok_dir, max_len, _ = _training_tokenizer(config, e.tokenizer_dir or None,
                                                      "the training run")
            from mlembed_jax.data.text_encoding import load_tokenizer

            base = dataclasses.replace(base, tokenizer=load_tokenizer(tok_dir),
                                       max_seq_length=max_len)
            beir = rev.load_beir(e.beir_dir, e.split, max_queries=int(e.max_queries),
                                 max_corpus=int(e.max_corpus), seed=int(e.seed))
            note = rev.describe_load(beir.info)
            if note:
                print(f"eval set {e.beir_dir}: {note}", flush=True)
            sets.append(rev.tokenize_set(base, beir, e.query_prefix, e.document_prefix))
    except (rev.RetrievalDataError, EncodeError, FileNotFoundError) as err:
        raise ConfigError(f"eval: {err}") from None
    if e.heldout and int(e.max_queries) > 0:  # the same cap for the held-out sets
        sets = [_cap_queries(s, int(e.max_queries), int(e.seed)) for s in sets]

    batch_tokens = int(e.batch_tokens)

    def evaluate(params, step: int) -> dict:
        """Embeds every set with `params` at the configured point; returns scalars."""
        del step  # the caller logs under its own step
        t0 = time.time()
        enc = dataclasses.replace(base, params=params)
        out, sums = {}, {}
        for s in sets:
            kw = dict(rank=rank, exit=exit, dim=dim, allow_untrained=bool(e.allow_untrained),
                      batch_tokens=batch_tokens)
            q = enc.encode_ids(s.queries, **kw)
            d = enc.encode_ids(s.docs, **kw)
            m = rev.evaluate_embeddings(s, q, d)
            for k in ("ndcg@10", "recall@100", "mrr@10"):
                out[f"eval/{s.name}/{k}"] = float(m[k])
                sums[k] = sums.get(k, 0.0) + float(m[k])
        if len(sets) > 1:
            out.update({f"eval/{k}": v / len(sets) for k, v in sums.items()})
        out["eval/seconds"] = time.time() - t0
        return out

    evaluate.sets = sets  # for logging / tests: what is evaluated
    evaluate.point = {"rank": rank, "exit": exit, "dim": dim}
    return evaluate


def _cap_queries(s, n: int, seed: int):
    """A seeded sample of n queries of a held-out set (the corpus is kept whole)."""
    import numpy as np

    if len(s.query_ids) <= n:
        return s
    pick = np.sort(np.random.default_rng(seed).choice(len(s.query_ids), n, replace=False))
    qids = [s.query_ids[i] for i in pick]
    return dataclasses.replace(s, query_ids=qids, queries=[s.queries[i] for i in pick],
                               qrels={q: s.qrels[q] for q in qids})

