"""Retrieval evaluation.

Modules:
  retrieval  BEIR-layout data, exact blocked search, nDCG@10 / Recall@100 / MRR@10
  periodic   the retrieval evaluator the training loop calls on its schedule
"""
