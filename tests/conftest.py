"""Test session set-up: 8 fake CPU devices (sharding tests) before jax is first imported."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Shared test helpers (tests/hf_reference.py) import as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
