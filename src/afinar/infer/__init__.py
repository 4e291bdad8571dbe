"""Inference: load a base model or a trained run, generate answers (batched or streamed)."""
