"""The model's attention entry point; it lives in `af_next_jax.attention` (dispatch.py)."""

from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.attention.masking import EMPTY_ROW_LSE, MASK_SCORE
from af_next_jax.attention.reference import xla_attention

__all__ = ["dot_product_attention", "xla_attention", "EMPTY_ROW_LSE", "MASK_SCORE"]
