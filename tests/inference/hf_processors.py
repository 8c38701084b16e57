"""The processors of released AF3 / Music Flamingo checkpoints, as transformers' conversion scripts build
them (reference data), saved next to a tokenizer.json of our choice.

The chat templates below are copied from transformers' `models/audioflamingo3/convert_audioflamingo3_to_hf.py`
and `models/musicflamingo/convert_musicflamingo_to_hf.py` (`write_processor`): the same ChatML as ours,
but with a default system prompt when the conversation has none, and the audio item rendered as one
`<sound>` directly before the text (no "\\n").
"""

from __future__ import annotations

from pathlib import Path

AF3_SYSTEM_PROMPT = "You are a helpful assistant."
MUSIC_FLAMINGO_SYSTEM_PROMPT = (
    "You are Music Flamingo, a multimodal assistant for language and music. "
    "On each turn you receive an audio clip which contains music and optional text, "
    "you will receive at least one or both; use your world knowledge and reasoning "
    "to help the user with any task. Interpret the entirety of the content any input music"
    "--regardlenss of whether the user calls it audio, music, or sound."
)


def processor_chat_template(system_prompt: str) -> str:
    # fmt: off
    return (
        "{% if messages[0]['role'] != 'system' %}"
            "<|im_start|>system\n" + system_prompt + "<|im_end|>\n"
        "{% endif %}"
        "{% for m in messages if m['content'] is not none %}"
            "<|im_start|>{{ m['role'] }}\n"
            "{% if m['content'] is string %}"
                "{{ m['content'] }}"
            "{% else %}"
                "{% set audio = namespace(found=False) %}"
                "{% set text_buf = namespace(v='') %}"
                "{% for c in m['content'] %}"
                    "{% if c.get('type') == 'audio' or 'audio' in c %}"
                        "{% set audio.found = True %}"
                    "{% elif c.get('type') == 'text' or 'text' in c %}"
                        "{% set text_buf.v = text_buf.v + c['text'] %}"
                    "{% endif %}"
                "{% endfor %}"
                "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
            "{% endif %}"
            "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
            "<|im_start|>assistant\n"
        "{% endif %}"
    )
    # fmt: on


FAMILIES = {  # model_type -> (processor class, default system prompt)
    "audioflamingo3": ("AudioFlamingo3Processor", AF3_SYSTEM_PROMPT),
    "musicflamingo": ("MusicFlamingoProcessor", MUSIC_FLAMINGO_SYSTEM_PROMPT),
}


def save_released_processor(directory: Path, family: str, tokenizer_json: Path, config) -> None:
    """`processor.save_pretrained(directory)` of the family's processor as its conversion script builds
    it, over `tokenizer_json`, with the feature extractor and audio cap of our `config`."""
    import transformers

    processor_class, system_prompt = FAMILIES[family]
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    encoder = config.encoder
    feature_extractor = transformers.WhisperFeatureExtractor(
        feature_size=encoder.num_mel_bins, chunk_length=int(encoder.window_seconds), return_attention_mask=True)
    processor = getattr(transformers, processor_class)(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=processor_chat_template(system_prompt),
        max_audio_len=int(config.max_windows_per_audio * encoder.window_seconds))
    processor.save_pretrained(str(directory))
