"""Hugging Face import/export: `python -m af_next_jax.convert {from-hf,to-hf,verify}`."""
