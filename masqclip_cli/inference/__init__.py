"""Inference: post-processing, the result type, the batched engine."""
