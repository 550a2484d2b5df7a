"""Answers from runs: ``caitlab-report``, ``caitlab-bench`` and ``caitlab-attention``."""
