"""Shared fixtures for the data tests: a small demo dataset, its tokenizer, the tiny model config."""

import numpy as np
import pytest

from af_next_jax import config as config_lib


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from af_next_jax.data.demo import make_demo

    out = tmp_path_factory.mktemp("demo")
    make_demo(str(out), num_train_clips=8, num_heldout_clips=2, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    from af_next_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(str(demo_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_config(demo_tokenizer):
    return config_lib.tiny().replace(**demo_tokenizer.model_config_ids())


def _write_wav(path, samples, sample_rate=16000):
    import soundfile

    soundfile.write(str(path), np.asarray(samples, np.float32), sample_rate)
    return str(path)


@pytest.fixture
def write_wav():
    """write_wav(path, samples, sample_rate=16000) -> str path of a float32 WAV."""
    return _write_wav
