"""Evaluation: held-out loss, generation metrics, checks, base-vs-tuned reports."""
