"""From requests (audios + ChatML turns + variant) to decoded answers: what the CLI and evaluator call.

    loaded = load_model(checkpoint="workdir/debug")
    answers = answer_requests(loaded, generator_for(loaded.config), [request], max_new_tokens=64)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax

from af_next_jax.data.manifest import AudioRef, Turn
from af_next_jax.inference.decoding import Generator
from af_next_jax.inference.loading import LoadedModel
from af_next_jax.inference.prompts import (VARIANT_PREFIX, encode_prompt, load_audio_input, model_chat_template,
                                          prompt_batch)
from af_next_jax.inference.sampling import SamplingConfig

# Prompt lengths are padded up to a multiple of this, so batches of similar prompts share one compilation.
LENGTH_BUCKET = 64
THINK_PATTERN = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Request:
    audio: tuple[AudioRef | str, ...]
    turns: tuple[Turn, ...]        # system / user turns, ending with a user turn
    variant: str = "instruct"


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str                      # the whole assistant turn: variant prefix + generated text
    think: str | None              # the <think> chain, when there is one
    answer: str                    # the text after </think> (all of it when there is no chain)
    num_tokens: int
    stopped: bool                  # ended on a stop token (False: cut at max_new_tokens)


def split_think(text: str) -> tuple[str | None, str]:
    """(`<think>` chain or None, answer): an unclosed chain (cut by max_new_tokens) leaves no answer."""
    match = THINK_PATTERN.search(text)
    if match is None:
        return None, text.strip()
    return match.group(1).strip(), text[match.end():].strip()


def answer_requests(loaded: LoadedModel, generator: Generator, requests: Sequence[Request], *, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), key=None, num_windows: int | None = None,
                    audios=None) -> list[Answer]:
    """Generate for `requests` as one left-padded batch. `audios[i]` are request i's featurised audios
    (`prompts.load_audio_input`), loaded here when not given; audio errors propagate (`AudioError`).
    Prompts are rendered in the model's chat format (`prompts.model_chat_template`)."""
    tokenizer, config = loaded.tokenizer, loaded.config
    if audios is None:
        audios = [[load_audio_input(ref, config) for ref in request.audio] for request in requests]
    chat_template = model_chat_template(tokenizer)
    rows = [encode_prompt(request.turns, tokenizer, [a.token_count for a in row_audio], config,
                          variant=request.variant, chat_template=chat_template)
            for request, row_audio in zip(requests, audios)]
    longest = max(len(row) for row in rows)
    batch = prompt_batch(rows, audios, config, pad_id=tokenizer.special.pad,
                         length=-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, num_windows=num_windows)
    key = jax.random.key(0) if key is None and sampling.greedy else key
    stops = loaded.stop_token_ids()
    result = generator.generate(loaded.params, batch, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                                pad_id=tokenizer.special.pad, sampling=sampling, key=key)
    answers = []
    for index, request in enumerate(requests):
        tokens = result.row(index)
        shown = tokens[:-1] if result.stopped_B[index] else tokens  # the stop token is not text
        text = VARIANT_PREFIX[request.variant] + tokenizer.decode(shown)
        think, answer = split_think(text)
        answers.append(Answer(text, think, answer, len(tokens), bool(result.stopped_B[index])))
    return answers
