import os
import sys

import numpy as np
import pytest

# Helpers of this folder (decoding_helpers.py) import as top-level modules, as tests/hf_reference.py does.
sys.path.insert(0, os.path.dirname(__file__))

TEXTS = ["At what time does the beep start?", "The beep starts at 2.4s.", "A noise burst runs from 1.0s to 2.0s.",
         "Which comes first, the beep or the noise burst?", "You are a helpful assistant that listens to audio."]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """ROOT/ckpt: a converted checkpoint of a tiny random model (+ its tokenizer.json); ROOT/long.wav
    (12.3 s: three 5 s windows of the tiny encoder) and ROOT/short.wav (1 s)."""
    import flax.linen as nn
    import jax
    import soundfile

    from af_next_jax.config import SAMPLE_RATE, tiny
    from af_next_jax.convert import orbax_io
    from af_next_jax.data.demo import train_demo_tokenizer
    from af_next_jax.data.tokenizer import load_tokenizer
    from af_next_jax.model.af_next import AFNextModel
    from af_next_jax.model.synthetic import synthetic_batch

    root = tmp_path_factory.mktemp("generate_cli")
    train_demo_tokenizer(TEXTS * 20, str(root / "tokenizer.json"))
    tokenizer = load_tokenizer(str(root / "tokenizer.json"))
    config = tiny(**tokenizer.model_config_ids())
    batch = synthetic_batch(config, audio_frames_per_example=[[500]], seq_len=256)
    params = jax.tree.map(np.asarray, AFNextModel(config).init(jax.random.key(0), batch))
    ckpt = root / "ckpt"
    ckpt.mkdir()
    orbax_io.save_checkpoint(ckpt, nn.unbox(params), config)
    (ckpt / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    t = np.arange(int(12.3 * SAMPLE_RATE)) / SAMPLE_RATE
    soundfile.write(root / "long.wav", 0.3 * np.sin(2 * np.pi * 440 * t), SAMPLE_RATE)  # 3 tiny windows
    soundfile.write(root / "short.wav", 0.1 * np.random.default_rng(0).normal(size=SAMPLE_RATE), SAMPLE_RATE)
    return root


