"""Parallelism applied from outside the model (context parallelism in context_parallel.py)."""
