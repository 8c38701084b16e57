"""Shared, session-scoped pieces of the trainer tests: one tiny model, one compiled train step.

Compiling a train step costs tens of seconds on a 2-core CPU, so every in-process test that needs
one reuses `compiled_step` (2 micro-batches of gradient accumulation, stage `full`).
"""

from __future__ import annotations

import os

import jax
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.experiment import load_config
from af_next_jax.train.optimizer import make_optimizer, parameter_labels, trainable_mask
from af_next_jax.experiment import unbox
from af_next_jax.train.train_step import make_train_step, new_train_state
from trainer_helpers import REPO, micro_batch

@pytest.fixture(scope="session")
def debug_config():
    return load_config(os.path.join(REPO, "experiments", "debug.py"))


@pytest.fixture(scope="session")
def tiny_setup(debug_config):
    config = tiny()
    model = AFNextModel(config)
    params = unbox(jax.jit(model.init)(jax.random.PRNGKey(0), micro_batch(0)))
    labels = parameter_labels(params, "full")
    optimizer, schedule = make_optimizer(debug_config.optimizer, labels, total_steps=50)
    return dict(config=config, model=model, params=params, labels=labels, optimizer=optimizer, schedule=schedule)


@pytest.fixture(scope="session")
def compiled_step(tiny_setup):
    """jit(train_step) for [2, B, L] batches (halting after 2 non-finite steps in a row, as the loop's
    would); the state is not donated so tests can reuse it."""
    s = tiny_setup
    return jax.jit(make_train_step(s["model"], s["optimizer"], s["schedule"], trainable_mask(s["labels"]),
                                   loss_chunk_length=64, max_nonfinite_streak=2))


@pytest.fixture(scope="session")
def initial_state(tiny_setup):
    s = tiny_setup
    return jax.jit(lambda p: new_train_state(p, s["optimizer"], jax.random.PRNGKey(1)))(s["params"])

# `demo_data` (the bundled demo dataset) is a session fixture of tests/conftest.py.
