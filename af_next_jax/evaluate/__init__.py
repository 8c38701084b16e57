"""Evaluation: generate for a manifest and score each answer by its task (scorers.py)."""
