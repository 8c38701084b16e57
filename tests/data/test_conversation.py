"""ChatML + <sound> expansion + assistant-only loss mask.

The audio layout is checked against transformers' own processors, chosen by the `model_type` our
converter writes for the config: `AudioFlamingo3Processor` (no RoTE: a bare `<sound>` run) and
`MusicFlamingoProcessor` (RoTE: the run wrapped in `<|sound_bos|>`/`<|sound_eos|>`).
"""

import json

import numpy as np
import pytest

from af_next_jax import config as config_lib
from af_next_jax.data.conversation import encode_conversation, uses_audio_markers
from af_next_jax.data.manifest import Turn

TURNS = (Turn("system", "You are a helpful assistant that listens to audio."),
         Turn("user", "<sound>\nWhich comes first?"),
         Turn("assistant", "<think>A tone plays from 2.4s to 3.1s.</think>The beep comes first."))
LAYOUTS = {"musicflamingo": True, "audioflamingo3": False}  # model family -> audio markers


def test_the_model_config_decides_the_audio_layout():
    assert uses_audio_markers(config_lib.af_next_7b()) and uses_audio_markers(config_lib.tiny())
    assert not uses_audio_markers(config_lib.af3_7b())
    assert not uses_audio_markers(config_lib.tiny(rote=None))


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_chatml_rendering_with_sound_expansion(demo_tokenizer, family):
    ids, _ = encode_conversation(TURNS, demo_tokenizer, [7], audio_markers=LAYOUTS[family])
    run = "<sound>" * 7
    expected = ("<|im_start|>system\nYou are a helpful assistant that listens to audio.<|im_end|>\n"
                "<|im_start|>user\n" + ("<|sound_bos|>" + run + "<|sound_eos|>" if LAYOUTS[family] else run) +
                "\nWhich comes first?<|im_end|>\n"
                "<|im_start|>assistant\n"
                "<think>A tone plays from 2.4s to 3.1s.</think>The beep comes first.<|im_end|>\n")
    assert demo_tokenizer.decode(ids) == expected
    assert ids.dtype == np.int32
    assert int((ids == demo_tokenizer.special.audio).sum()) == 7


@pytest.mark.parametrize("audio_markers", [True, False])
def test_loss_mask_covers_assistant_content_and_im_end_only(demo_tokenizer, audio_markers):
    ids, trainable = encode_conversation(TURNS, demo_tokenizer, [7], audio_markers=audio_markers)
    trained_text = demo_tokenizer.decode(ids[trainable])
    assert trained_text == "<think>A tone plays from 2.4s to 3.1s.</think>The beep comes first.<|im_end|>"
    # The trained span is one contiguous run at the end, before the final newline.
    trained_positions = np.flatnonzero(trainable)
    assert np.all(np.diff(trained_positions) == 1) and trained_positions[-1] == len(ids) - 2


def test_each_placeholder_gets_its_own_audio_count(demo_tokenizer):
    turns = (Turn("user", "<sound> then <sound>"), Turn("assistant", "ok"))
    special = demo_tokenizer.special
    ids, _ = encode_conversation(turns, demo_tokenizer, [3, 5], audio_markers=True)
    bos = np.flatnonzero(ids == special.audio_bos)
    eos = np.flatnonzero(ids == special.audio_eos)
    assert (eos - bos - 1).tolist() == [3, 5]
    bare, _ = encode_conversation(turns, demo_tokenizer, [3, 5], audio_markers=False)
    assert not np.isin(bare, [special.audio_bos, special.audio_eos]).any()
    assert bare.tolist() == [i for i in ids.tolist() if i not in (special.audio_bos, special.audio_eos)]


def test_multi_turn_masks_every_assistant_turn(demo_tokenizer):
    turns = (Turn("user", "<sound>one"), Turn("assistant", "A"), Turn("user", "two"), Turn("assistant", "B"))
    ids, trainable = encode_conversation(turns, demo_tokenizer, [2], audio_markers=True)
    assert demo_tokenizer.decode(ids[trainable]) == "A<|im_end|>B<|im_end|>"


# Audio lengths (tiny preset: 5 s windows, 4 per audio = 20 s): several windows with a short last one,
# one short window, a last window too short for an encoder token (dropped by us, 0 tokens for
# transformers), and audio beyond the window cap (both truncate it).
AUDIO_SECONDS = (12.03, 3.0, 10.0 + 200 / 16000, 21.5)


@pytest.fixture(scope="module")
def hf_tokenizer(demo_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(demo_dir / "tokenizer.json"), pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def speech_like_manifest(tmp_path_factory):
    """A manifest with one audio per line (transformers' processors take one audio per text)."""
    import soundfile

    folder = tmp_path_factory.mktemp("layout")
    rng = np.random.default_rng(0)
    lines, audios = [], []
    for index, seconds in enumerate(AUDIO_SECONDS):
        samples = (0.1 * rng.standard_normal(int(round(seconds * 16000)))).astype(np.float32)
        soundfile.write(str(folder / f"{index}.wav"), samples, 16000, subtype="FLOAT")
        audios.append(samples)
        conversation = [{"role": "system", "content": "You are a helpful assistant that listens to audio."},
                        {"role": "user", "content": f"What is in clip {index}?\n<sound>"},
                        {"role": "assistant", "content": "<think>A noise from 0.0s.</think>Noise."}]
        lines.append(json.dumps({"audio": [f"{index}.wav"], "conversation": conversation}))
    return folder, lines, audios


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_prepared_examples_match_transformers_processor(family, demo_dir, demo_tokenizer, hf_tokenizer,
                                                        speech_like_manifest):
    """Token ids, log-mel windows and valid frames of our pipeline equal those of the processor that
    transformers maps to the model_type our converter writes for this config."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    import transformers

    from af_next_jax.convert.hf_config import to_hf_config
    from af_next_jax.data.pipeline import ExamplePreparer

    model_config = config_lib.tiny(**({} if LAYOUTS[family] else {"rote": None}),
                                   **demo_tokenizer.model_config_ids())
    model_type = to_hf_config(model_config)["model_type"]
    assert model_type == family
    encoder = model_config.encoder
    processor = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])(
        feature_extractor=WhisperFeatureExtractor(feature_size=encoder.num_mel_bins,
                                                  chunk_length=int(encoder.window_seconds)),
        tokenizer=hf_tokenizer, max_audio_len=model_config.max_windows_per_audio * encoder.window_seconds)
    preparer = ExamplePreparer(tokenizer_path=str(demo_dir / "tokenizer.json"), model_config=model_config,
                               seq_len=4096, max_windows_per_audio=model_config.max_windows_per_audio,
                               max_windows_per_batch=16)
    folder, lines, audios = speech_like_manifest
    for line, samples in zip(lines, audios):
        prepared = preparer.prepare(line, str(folder))
        conversation = json.loads(line)["conversation"]
        text = "".join(f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n" for turn in conversation)
        reference = processor(text=[text], audio=[samples])
        assert prepared["token_ids"].tolist() == reference["input_ids"][0].tolist()
        # Windows that carry encoder tokens match transformers' windows one for one.
        frames = reference["input_features_mask"].numpy().sum(-1)
        kept = frames >= 3
        assert prepared["valid_frames"].tolist() == frames[kept].tolist()
        np.testing.assert_allclose(prepared["mel"], reference["input_features"].numpy()[kept], atol=1e-4)
        markers = np.isin(prepared["token_ids"], [demo_tokenizer.special.audio_bos, demo_tokenizer.special.audio_eos])
        assert markers.sum() == (2 if LAYOUTS[family] else 0)
