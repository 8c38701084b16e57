"""Helpers of the ablation notebooks (notebooks/*.ipynb) and the command that executes them."""
