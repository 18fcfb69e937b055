"""Evaluation: BEIR data, exact search and metrics (retrieval), and the two evaluators the
training loop runs: the held-out validation loss every train.validation_every steps
(validation) and retrieval every eval.retrieval_every steps (periodic).

An evaluator has `name` (its metrics prefix: "val", "eval"), `every` (steps), `at_start`
(also at step 0 of a fresh run) and is called as evaluator(params, step) -> {metric: float}.

Modules:
  retrieval   BEIR-layout data, exact blocked search, nDCG@10 / Recall@100 / MRR@10
  periodic    the retrieval evaluator the training loop calls on its schedule
  validation  the held-out validation-loss evaluator
  mteb_adapter  an mteb encoder over the packed encode, at any (rank, exit, dim) point
  mteb_tasks  local MTEB tasks from files (BEIR layout, STS jsonl); task resolution
"""
