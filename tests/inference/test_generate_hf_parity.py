"""`python -m af_next_jax.generate --hf-dir` on a float32 Music Flamingo repository answers as transformers does.

The repository is what a released checkpoint looks like: `save_pretrained` of a random
MusicFlamingoForConditionalGeneration (float32; shapes no other test uses: 3 decoder layers, 1 KV head
for 6 query heads, hidden 96; weights x4 so the answer depends on the context, decoding_helpers.py)
and of the processor its conversion script builds (hf_processors.py: its chat template with Music
Flamingo's default system prompt). The reference is transformers' own recipe (README's
`processor.apply_chat_template` + `model.generate(do_sample=False)`); ours is the command line, its
printed answer. The same stop tokens on both sides (generation_config.json: <|im_end|>, <|endoftext|>).
"""

import numpy as np
import pytest
import soundfile
import torch
import transformers

from af_next_jax import generate as generate_cli
from af_next_jax.config import SAMPLE_RATE, DecoderConfig, tiny
from af_next_jax.data.tokenizer import load_tokenizer
from af_next_jax.inference.answer import split_think
from conftest import TEXTS
from decoding_helpers import build_varied_audio_model
from hf_processors import save_released_processor

NEW_TOKENS = 10
QUESTIONS = [("short", "What do you hear?"), ("long", "At what time does the beep start?"),
             ("long", "Which comes first, the beep or the noise burst?")]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(repository, transformers model, processor, {name: wav path})."""
    from af_next_jax.data.demo import train_demo_tokenizer

    root = tmp_path_factory.mktemp("released_music_flamingo")
    train_demo_tokenizer(TEXTS * 20, str(root / "tokenizer.json"))
    tokenizer = load_tokenizer(str(root / "tokenizer.json"))
    config = tiny(**tokenizer.model_config_ids()).replace(decoder=DecoderConfig(
        vocab_size=1024, hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6, num_kv_heads=1,
        head_dim=16, rope_theta=1e4, max_position_embeddings=4096))
    hf_model, _ = build_varied_audio_model(config, seed=3)
    special = tokenizer.special
    hf_model.generation_config.eos_token_id = [special.im_end, special.pad]
    hf_model.generation_config.pad_token_id = special.pad
    repository = root / "hf"
    hf_model.save_pretrained(repository)
    save_released_processor(repository, "musicflamingo", root / "tokenizer.json", config)

    rng = np.random.default_rng(1)
    t = np.arange(int(7.3 * SAMPLE_RATE)) / SAMPLE_RATE  # two windows of the tiny encoder's 5 s
    clips = {"short": 0.2 * rng.normal(size=SAMPLE_RATE),
             "long": 0.05 * rng.normal(size=t.size) + 0.4 * np.sin(2 * np.pi * 660 * t) * ((t > 2.4) & (t < 2.9))}
    paths = {}
    for name, samples in clips.items():
        paths[name] = str(root / f"{name}.wav")
        soundfile.write(paths[name], samples.astype(np.float32), SAMPLE_RATE)
    return repository, hf_model, transformers.AutoProcessor.from_pretrained(repository), paths


def transformers_answer(processor, hf_model, clip: str, question: str) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens up to the first stop token) of transformers' recipe."""
    conversation = [{"role": "user", "content": [{"type": "audio", "path": clip}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)
    with torch.no_grad():
        output = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    new = output[0, len(prompt):].tolist()
    stops = hf_model.generation_config.eos_token_id
    return prompt, new[:next((i for i, token in enumerate(new) if token in stops), len(new))]


def test_generate_cli_gives_transformers_greedy_answers(released, capsys):
    from af_next_jax.inference.loading import load_model
    from af_next_jax.inference.prompts import (default_system_prompt, encode_prompt, load_audio_input,
                                               model_chat_template, prompt_turns)

    repository, hf_model, processor, clips = released
    assert hf_model.dtype == torch.float32
    loaded = load_model(hf_dir=str(repository))  # what the command line loads
    tokenizer, config = loaded.tokenizer, loaded.config
    template = model_chat_template(tokenizer)
    for clip, question in QUESTIONS:
        prompt, expected_tokens = transformers_answer(processor, hf_model, clips[clip], question)
        ours = encode_prompt(prompt_turns(question, 1, system=default_system_prompt(template)), tokenizer,
                             [load_audio_input(clips[clip], config).token_count], config, chat_template=template)
        assert ours.tolist() == prompt
        assert len(set(expected_tokens)) > 3, expected_tokens  # not a one-token loop
        assert generate_cli.main(["--hf-dir", str(repository), "--audio", clips[clip], "--prompt", question,
                                  "--max-new-tokens", str(NEW_TOKENS)]) == 0
        printed = capsys.readouterr().out
        think, answer = split_think(tokenizer.decode(expected_tokens))
        expected = (f"<think>{think}</think>\n" if think is not None else "") + answer + "\n"
        assert printed == expected, (question, prompt[-8:], expected_tokens)
