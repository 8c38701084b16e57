"""Pallas kernels for the attention hot path (imported as `af_next_kernels`)."""
