"""Retrieval evaluation.

Modules:
  retrieval  BEIR-layout data, exact blocked search, nDCG@10 / Recall@100 / MRR@10
  periodic   the retrieval evaluator the training loop calls on its schedule
  cli        the flags and loading shared by tools/eval_retrieval and matryoshka_report
"""
