"""The attention config: `attention_kernel` and `sequence_parallelism` chosen apart; the deprecated
`attention_implementation` still loads (experiment files, converted checkpoints) with a warning."""

import dataclasses
import warnings

import pytest

from af_next_jax.config import tiny
from af_next_jax.convert.orbax_io import config_from_dict, config_to_dict


def test_old_checkpoint_config_with_the_single_knob_loads_with_a_deprecation_warning():
    old = config_to_dict(tiny())
    del old["attention_kernel"], old["sequence_parallelism"]
    old["attention_implementation"] = "hybrid"
    with pytest.warns(DeprecationWarning, match="attention_implementation='hybrid' is deprecated"):
        config = config_from_dict(old)
    assert (config.attention_kernel, config.sequence_parallelism) == ("auto", "hybrid")
    assert config.attention_implementation == "hybrid"  # still readable by code that reads it


def test_new_config_round_trips_without_a_warning():
    config = tiny(attention_kernel="pallas", sequence_parallelism="ring")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("legacy,kernel,strategy", [("xla", "xla", "none"), ("pallas", "pallas", "none"),
                                                    ("ring", "auto", "ring"), ("ulysses", "auto", "ulysses")])
def test_replacing_the_old_knob_sets_both_new_fields(legacy, kernel, strategy):
    base = tiny(attention_kernel="pallas", sequence_parallelism="hybrid")
    with pytest.warns(DeprecationWarning):
        config = base.replace(attention_implementation=legacy)
    assert (config.attention_kernel, config.sequence_parallelism, config.attention_implementation) == (
        kernel, strategy, legacy)


def test_replacing_a_new_field_keeps_the_other_and_rederives_the_old_name():
    config = tiny(sequence_parallelism="hybrid").replace(attention_kernel="pallas")
    assert (config.attention_kernel, config.sequence_parallelism, config.attention_implementation) == (
        "pallas", "hybrid", "hybrid")


def test_a_contradicting_old_knob_is_rejected():
    fields = dataclasses.asdict(tiny(attention_kernel="pallas"))
    fields["attention_implementation"] = "ring"
    with pytest.raises(ValueError, match="contradicts attention_kernel='pallas'"):
        config_from_dict(fields)
