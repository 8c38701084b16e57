"""Prompts for released AF3 and Music Flamingo checkpoints: token for token what their own transformers
processors build, `processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)`,
audio runs, markers and the default system prompt included.

The processors are the ones transformers' conversion scripts build (hf_processors.py: their chat
templates, verbatim), saved next to Qwen2.5's real vocabulary (the qwen.tiktoken fixture, with AF-Next's
audio and think tokens) and, so that the test also runs without the fixture, the demo's byte-level BPE.
Our side reads the template from the saved directory (`model_chat_template`), as `generate --hf-dir` does.
"""

import functools
import os
import sys

import numpy as np
import pytest
import soundfile
import transformers

from af_next_jax.config import SAMPLE_RATE, af3_7b, af_next_7b, tiny
from af_next_jax.data.tokenizer import load_tokenizer
from af_next_jax.inference.prompts import (default_system_prompt, encode_prompt, load_audio_input, model_chat_template,
                                           prompt_turns)
from conftest import TEXTS
from hf_processors import FAMILIES, save_released_processor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
from external_fixtures import fixture_path  # noqa: E402
from test_qwen_vocab import QWEN_PATTERN, QWEN_SPECIALS  # noqa: E402

QUESTION = "When does the beep start?"


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """vocabulary name -> a function giving (its tokenizer.json, the model config of each family), built
    once, on first use (the Qwen one needs the fixture)."""
    root = tmp_path_factory.mktemp("vocabularies")

    @functools.cache
    def qwen():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        tokenizer = TikTokenConverter(vocab_file=fixture_path("qwen.tiktoken"), pattern=QWEN_PATTERN).converted()
        tokenizer.add_special_tokens(QWEN_SPECIALS)
        tokenizer.save(str(root / "qwen.json"))
        return root / "qwen.json", {"audioflamingo3": af3_7b(), "musicflamingo": af_next_7b()}

    @functools.cache
    def demo():
        from af_next_jax.data.demo import train_demo_tokenizer

        train_demo_tokenizer(TEXTS * 20, str(root / "demo.json"))
        config = tiny(**load_tokenizer(str(root / "demo.json")).model_config_ids())
        return root / "demo.json", {"audioflamingo3": config.replace(rote=None), "musicflamingo": config}

    return {"qwen": qwen, "demo": demo}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3.2 s: a beep over noise (a short last window of the tiny encoder's 5 s, of a 30 s one too)."""
    t = np.arange(int(3.2 * SAMPLE_RATE)) / SAMPLE_RATE
    samples = 0.05 * np.random.default_rng(0).normal(size=t.size) + 0.3 * np.sin(2 * np.pi * 880 * t) * (t > 1.2)
    path = tmp_path_factory.mktemp("clip") / "beep.wav"
    soundfile.write(path, samples.astype(np.float32), SAMPLE_RATE)
    return str(path)


def _released(tmp_path, tokenizer_files, vocabulary, family):
    tokenizer_json, configs = tokenizer_files[vocabulary]()
    config = configs[family]
    save_released_processor(tmp_path / "hf", family, tokenizer_json, config)
    return config, load_tokenizer(str(tmp_path / "hf" / "tokenizer.json")), tmp_path / "hf"


def _processor_ids(directory, messages) -> list[int]:
    processor = transformers.AutoProcessor.from_pretrained(directory)
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("vocabulary", ["qwen", "demo"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_equals_the_released_processors_chat_template(family, vocabulary, tokenizer_files, clip, tmp_path):
    config, tokenizer, directory = _released(tmp_path, tokenizer_files, vocabulary, family)
    template = model_chat_template(tokenizer)
    assert template is not None
    audio = load_audio_input(clip, config)
    turns = prompt_turns(QUESTION, 1, system=default_system_prompt(template))
    ours = encode_prompt(turns, tokenizer, [audio.token_count], config, chat_template=template)

    expected = _processor_ids(directory, [{"role": "user", "content": [
        {"type": "audio", "path": clip}, {"type": "text", "text": QUESTION}]}])
    assert ours.tolist() == expected
    # What the ids say: the family's default system prompt, its audio layout, the question right after it.
    special = tokenizer.special
    run = [special.audio] * audio.token_count
    run = [special.audio_bos, *run, special.audio_eos] if family == "musicflamingo" else run
    system_prompt = FAMILIES[family][1]
    assert tokenizer.decode(ours[:ours.tolist().index(special.audio)]).startswith(
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n")
    start = ours.tolist().index(run[0])
    assert ours[start:start + len(run)].tolist() == run
    assert tokenizer.decode(ours[start + len(run):]) == f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_given_system_prompt_replaces_the_templates_default(family, tokenizer_files, clip, tmp_path):
    config, tokenizer, directory = _released(tmp_path, tokenizer_files, "demo", family)
    template = model_chat_template(tokenizer)
    audio = load_audio_input(clip, config)
    ours = encode_prompt(prompt_turns(QUESTION, 1, system="Listen."), tokenizer, [audio.token_count], config,
                         chat_template=template)
    expected = _processor_ids(directory, [{"role": "system", "content": "Listen."}, {"role": "user", "content": [
        {"type": "audio", "path": clip}, {"type": "text", "text": QUESTION}]}])
    assert ours.tolist() == expected
    assert tokenizer.decode(ours).startswith("<|im_start|>system\nListen.<|im_end|>\n")


def test_models_trained_here_keep_the_training_chatml(tokenizer_files):
    """No template beside the tokenizer (a training run's, a converted checkpoint of ours): our ChatML,
    and the demo data's system prompt, as the model was trained."""
    from af_next_jax.data.demo import SYSTEM_PROMPT

    tokenizer_json, _ = tokenizer_files["demo"]()
    assert model_chat_template(load_tokenizer(str(tokenizer_json))) is None
    assert default_system_prompt(None) == SYSTEM_PROMPT
