"""Decoding from a trained model: prompts, the KV-cache decode loop and sampling."""
