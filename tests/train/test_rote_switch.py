"""`config.model.rote = None` in an experiment switches RoTE off (the RoTE ablation's control arm)."""

import os

from af_next_jax.config import RoteConfig
from af_next_jax.data.conversation import uses_audio_markers
from af_next_jax.experiment import load_config, model_config_from
from trainer_helpers import REPO


def test_rote_none_builds_the_same_model_without_rote():
    config = load_config(os.path.join(REPO, "experiments", "debug.py"))
    with_rote = model_config_from(config.model)
    config.model.rote = None
    without = model_config_from(config.model)
    assert isinstance(with_rote.rote, RoteConfig) and without.rote is None
    assert without.replace(rote=with_rote.rote) == with_rote
    assert uses_audio_markers(with_rote) and not uses_audio_markers(without)
