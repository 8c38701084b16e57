"""The attention config: `attention_kernel` and `sequence_parallelism` chosen apart. The removed one-knob
`attention_implementation` is refused wherever a config is built, with the two fields to set and what
the old value meant in them; configs stored by earlier versions (which wrote the old name beside the
two fields) still read, through `config.drop_stored_legacy_attention`."""

import dataclasses
import warnings

import ml_collections
import pytest

from af_next_jax.config import ModelConfig, drop_stored_legacy_attention, preset, tiny
from af_next_jax.convert.orbax_io import config_from_dict, config_to_dict

# What the refusal must say: the two fields, their valid values, and the old value's meaning in them.
REFUSAL = (r"attention_implementation was removed: set attention_kernel \(one of \('auto', 'xla', 'pallas'\)\) "
           r"and sequence_parallelism \(one of \('none', 'ring', 'ulysses', 'hybrid'\)\) instead; ")
MEANING = {"hybrid": "attention_kernel='auto', sequence_parallelism='hybrid'",
           "ring": "attention_kernel='auto', sequence_parallelism='ring'",
           "pallas": "attention_kernel='pallas', sequence_parallelism='none'",
           "xla": "attention_kernel='xla', sequence_parallelism='none'"}


def _experiment_model(**model_section):
    from af_next_jax.experiment.settings import model_config_from
    return model_config_from(ml_collections.ConfigDict({"preset": "tiny", **model_section}))


@pytest.mark.parametrize("build", [
    lambda value: ModelConfig(attention_implementation=value),
    lambda value: preset("tiny", attention_implementation=value),
    lambda value: tiny().replace(attention_implementation=value),
    lambda value: dataclasses.replace(tiny(), attention_implementation=value),
    lambda value: _experiment_model(attention_implementation=value),  # an experiment file's config.model
], ids=["constructor", "preset", "replace", "dataclasses.replace", "experiment_file"])
@pytest.mark.parametrize("value", sorted(MEANING))
def test_the_removed_knob_is_refused_with_the_two_fields_and_its_meaning(build, value):
    with pytest.raises(ValueError, match=REFUSAL + rf"attention_implementation='{value}' meant {MEANING[value]}$"):
        build(value)


def test_a_value_the_old_knob_never_took_is_refused_with_the_two_fields():
    with pytest.raises(ValueError, match=REFUSAL + "attention_implementation='flash' was never a valid value"):
        tiny(attention_implementation="flash")


def test_the_config_has_no_trace_of_the_removed_knob():
    config = tiny(sequence_parallelism="ring")
    assert "attention_implementation" not in config_to_dict(config)
    with pytest.raises(AttributeError):
        config.attention_implementation  # noqa: B018 (code still reading it fails loudly, never sees None)


def test_replace_is_dataclasses_replace():
    config = tiny(sequence_parallelism="hybrid")
    assert config.replace(attention_kernel="pallas") == dataclasses.replace(config, attention_kernel="pallas")
    assert config.replace(attention_kernel="pallas").sequence_parallelism == "hybrid"  # nothing re-derived


def test_new_config_round_trips_without_a_warning():
    config = tiny(attention_kernel="pallas", sequence_parallelism="ring")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("kernel,strategy", [("xla", "none"), ("auto", "none"), ("pallas", "ring"), ("auto", "hybrid")])
def test_a_stored_config_with_the_old_derived_name_reads_as_its_two_fields(kernel, strategy):
    """What earlier versions wrote (dataclasses.asdict): the old name derived from the two fields."""
    config = tiny(attention_kernel=kernel, sequence_parallelism=strategy)
    stored = {**config_to_dict(config), "attention_implementation": strategy if strategy != "none" else kernel}
    assert drop_stored_legacy_attention(stored) == config_to_dict(config)
    assert config_from_dict(stored) == config  # what every reader of a converted checkpoint or workdir calls


def test_a_stored_old_name_that_contradicts_the_two_fields_is_refused():
    stored = {**config_to_dict(tiny(attention_kernel="pallas")), "attention_implementation": "ring"}
    with pytest.raises(ValueError, match=r"stored attention_implementation='ring' contradicts attention_kernel="
                                         r"'pallas', sequence_parallelism='none' .* wrote 'pallas'"):
        drop_stored_legacy_attention(stored)


@pytest.mark.parametrize("old,kernel,strategy", [("xla", "xla", "none"), ("pallas", "pallas", "none"),
                                                 ("ring", "auto", "ring"), ("hybrid", "auto", "hybrid")])
def test_a_config_stored_before_the_split_reads_as_the_pair_it_meant(old, kernel, strategy):
    stored = config_to_dict(tiny())
    del stored["attention_kernel"], stored["sequence_parallelism"]
    fields = drop_stored_legacy_attention({**stored, "attention_implementation": old})
    assert (fields["attention_kernel"], fields["sequence_parallelism"]) == (kernel, strategy)
    assert "attention_implementation" not in fields


def test_a_stored_config_without_the_old_name_is_returned_as_is():
    stored = config_to_dict(tiny())
    assert drop_stored_legacy_attention(stored) == stored
