"""Evaluation: metrics, linear probe, retrieval."""
