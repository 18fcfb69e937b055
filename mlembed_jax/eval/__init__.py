"""Retrieval evaluation: BEIR data, exact search and metrics (retrieval), and the evaluator
the training loop calls every eval.every steps (periodic)."""
