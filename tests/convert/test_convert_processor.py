"""Issue 18: `to-hf` of a trained workdir is a complete transformers repository.

The debug experiment trains 2 steps on the demo data (the real data pipeline and the demo's BPE
tokenizer), `to-hf --checkpoint WORKDIR` exports it, and a transformers user's recipe runs on the
export: `AutoProcessor.from_pretrained`, `processor.apply_chat_template` with a demo clip and a
question, the model's forward pass. Token ids and features must be those of our own prompt path
(af_next_jax/inference/prompts.py, which renders with the data pipeline's conversation code), and
the chat template must render training conversations exactly as `encode_conversation` does.
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from af_next_jax.convert import hf_processor, orbax_io
from af_next_jax.data.conversation import encode_conversation, uses_audio_markers
from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, Turn
from af_next_jax.data.tokenizer import load_tokenizer
from conftest import run_cli, write_af_next_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTION = "When does the beep start?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, demo dir): 2 steps of the debug experiment on the demo data."""
    from af_next_jax.data.demo import make_demo
    from af_next_jax.experiment import load_config
    from af_next_jax.train.loop import train
    root = tmp_path_factory.mktemp("processor")
    make_demo(str(root / "demo"), num_train_clips=4, num_heldout_clips=1, seed=0)
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        f"--config.data.dir={root / 'demo'}", "--config.data.batch_size=8", "--config.data.seq_len=256",
        "--config.data.max_windows_per_batch=8", "--config.total_steps=2", "--config.eval_every=0",
        "--config.checkpoint_every=100", "--config.async_checkpointing=False", "--config.loss_chunk_length=64",
        "--config.peak_flops_per_device=1e11"])
    assert train(config, str(root / "run")).status == "finished"
    return root / "run", root / "demo"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    workdir, _ = trained
    out = tmp_path_factory.mktemp("export") / "hf"
    assert run_cli("to-hf", "--checkpoint", workdir, "--out", out, "--quiet") == 0
    return out


@pytest.fixture(scope="module")
def ours(trained):
    workdir, demo = trained
    config = orbax_io.load_config(workdir / "export")
    return config, load_tokenizer(str(demo / "tokenizer.json"))


@pytest.fixture(scope="module")
def clip(trained):
    _, demo = trained
    first = json.loads((demo / "train.jsonl").read_text().splitlines()[0])
    path = first["audio"] if isinstance(first.get("audio"), str) else first["audio"][0]
    path = path["path"] if isinstance(path, dict) else path
    return path if os.path.isabs(path) else str(demo / path)


def test_export_holds_the_processor_files(exported):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json"):
        assert (exported / name).is_file(), name


def test_auto_processor_loads_the_export(exported):
    processor = transformers.AutoProcessor.from_pretrained(exported)
    assert type(processor).__name__ == "MusicFlamingoProcessor"


def test_chat_template_gives_our_prompt_ids_and_features(exported, ours, clip):
    from af_next_jax.inference.prompts import encode_prompt, load_audio_input, prompt_turns
    config, tokenizer = ours
    processor = transformers.AutoProcessor.from_pretrained(exported)
    conversation = [{"role": "user", "content": [{"type": "audio", "path": clip}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)
    audio = load_audio_input(clip, config)
    expected = encode_prompt(prompt_turns(QUESTION, 1), tokenizer, [audio.token_count], config)
    assert inputs["input_ids"][0].tolist() == expected.tolist()
    features = inputs["input_features"].numpy()
    assert features.shape == audio.mel_WxMxT.shape
    np.testing.assert_allclose(features, audio.mel_WxMxT, atol=2e-4)
    np.testing.assert_array_equal(inputs["input_features_mask"].sum(-1).numpy(), audio.valid_frames_W)


@pytest.mark.parametrize("turns", [
    [Turn("system", "You are a helpful assistant that listens to audio."),
     Turn("user", f"{AUDIO_PLACEHOLDER}\nWhat do you hear?"),
     Turn("assistant", "<think>a beep at 1.0s</think>A beep.")],
    [Turn("user", f"{AUDIO_PLACEHOLDER}\nFirst?"), Turn("assistant", "One."), Turn("user", "And then?"),
     Turn("assistant", "Two.")],
])
def test_tokenizer_chat_template_renders_training_conversations_as_the_data_pipeline(exported, ours, turns):
    """The template and `encode_conversation` are one format: same ids, audio runs expanded alike."""
    config, tokenizer = ours
    processor = transformers.AutoProcessor.from_pretrained(exported)
    messages = [{"role": t.role, "content": t.content} for t in turns]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    count = 7
    run = AUDIO_PLACEHOLDER * count
    if uses_audio_markers(config):
        run = hf_processor.SPECIAL_TOKENS["audio_bos"] + run + hf_processor.SPECIAL_TOKENS["audio_eos"]
    hf_ids = processor.tokenizer(text.replace(AUDIO_PLACEHOLDER, run), add_special_tokens=False)["input_ids"]
    expected, _ = encode_conversation(turns, tokenizer, [count], audio_markers=uses_audio_markers(config))
    assert hf_ids == expected.tolist()


def test_generation_config_stops_at_the_end_of_the_assistant_turn(exported, ours):
    _, tokenizer = ours
    generation = json.loads((exported / "generation_config.json").read_text())
    assert tokenizer.special.im_end in generation["eos_token_id"]
    assert generation["pad_token_id"] == tokenizer.special.pad


def _recipe(directory, clip, max_new_tokens: int):
    """The README's transformers lines (af_next_jax/convert/hf_processor.py): processor, model, generate."""
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(directory)
    conversation = [{"role": "user", "content": [{"type": "audio", "path": clip}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)
    inputs = inputs.to(model.device, dtype=model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor, model, inputs, new_tokens, processor.decode(new_tokens, skip_special_tokens=True)


def test_transformers_greedy_generate_gives_our_tokens(trained, exported, ours, clip):
    """Greedy decoding of the float32 export in transformers = our Generator on our prompt batch."""
    from af_next_jax.inference.decoding import Generator
    from af_next_jax.inference.prompts import encode_prompt, load_audio_input, prompt_batch, prompt_turns
    workdir, _ = trained
    config, tokenizer = ours
    _, _, inputs, hf_tokens, _ = _recipe(exported, clip, max_new_tokens=8)
    audio = load_audio_input(clip, config)
    prompt = encode_prompt(prompt_turns(QUESTION, 1), tokenizer, [audio.token_count], config)
    batch = prompt_batch([prompt], [[audio]], config, pad_id=tokenizer.special.pad)
    params = orbax_io.load_params(workdir / "export")
    stops = (tokenizer.special.im_end, tokenizer.special.pad)
    result = Generator(config.replace(compute_dtype="float32")).generate(
        params, batch, max_new_tokens=8, stop_token_ids=stops, pad_id=tokenizer.special.pad)
    ours_tokens = result.row(0)
    assert ours_tokens and hf_tokens[:len(ours_tokens)].tolist() == ours_tokens


def test_bfloat16_export_runs_the_same_recipe(trained, clip, tmp_path):
    workdir, _ = trained
    assert run_cli("to-hf", "--checkpoint", workdir, "--out", tmp_path / "bf16", "--dtype", "bfloat16",
                   "--quiet") == 0
    _, model, inputs, tokens, answer = _recipe(tmp_path / "bf16", clip, max_new_tokens=4)
    assert model.dtype == torch.bfloat16 and inputs["input_features"].dtype == torch.bfloat16
    assert len(tokens) > 0 and isinstance(answer, str)


def test_round_trip_through_from_hf_keeps_the_processor_files(exported, tmp_path):
    """from-hf --hf-dir keeps the repository's tokenizer and template (here one with a default system
    prompt, as Music Flamingo's own repository has); to-hf writes them back unchanged, not ours."""
    import shutil
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository)
    template = "{{ '<|im_start|>system\\nYou are Music Flamingo.<|im_end|>\\n' }}" + hf_processor.CHAT_TEMPLATE
    (repository / "chat_template.jinja").write_text(template)
    assert run_cli("from-hf", "--hf-dir", repository, "--out", tmp_path / "ckpt", "--quiet") == 0
    assert run_cli("to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf", "--quiet") == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (repository / name).read_text(), name
    assert type(transformers.AutoProcessor.from_pretrained(tmp_path / "hf")).__name__ == "MusicFlamingoProcessor"


def test_audioflamingo3_export_gets_its_processor_and_bare_audio_runs(converted, saved_model, tmp_path):
    """No RoTE: AudioFlamingo3Processor, whose <sound> run has no bos/eos markers (our data layout too)."""
    model_type, config, _, _ = saved_model
    ckpt, _ = converted
    tokenizer_json = write_af_next_tokenizer(tmp_path / "tokenizer", config)
    assert run_cli("to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "--tokenizer-dir",
                   tokenizer_json.parent, "--quiet") == 0
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    expected = {"musicflamingo": "MusicFlamingoProcessor", "audioflamingo3": "AudioFlamingo3Processor"}
    assert type(processor).__name__ == expected[model_type]
    audio = np.zeros(16000, np.float32)  # 1 s: 25 encoder tokens
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Hi"}]}]
    ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][0].tolist()
    assert ids.count(config.audio_token_id) == 25
    assert (config.audio_bos_token_id in ids) == (model_type == "musicflamingo")


def test_export_folder_of_a_workdir_finds_the_runs_tokenizer(trained, exported, tmp_path):
    """`--checkpoint WORKDIR/export` (README's form) is the same model as `--checkpoint WORKDIR`."""
    workdir, _ = trained
    assert run_cli("to-hf", "--checkpoint", workdir / "export", "--out", tmp_path / "hf", "--quiet") == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (exported / name).read_text(), name


def readme_recipe() -> str:
    """The python block under `<!-- hf-recipe -->` in README.md, verbatim."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    block = readme.split("<!-- hf-recipe -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "AutoProcessor.from_pretrained" in block and "generate(" in block
    return block


def test_the_readme_recipe_answers_a_question_about_a_demo_clip(exported, clip, ours, capsys):
    """README's transformers lines, run as written on this export (only the two paths are swapped)."""
    recipe = readme_recipe()
    for documented in ("workdir/debug/hf", "demo_data/clips/heldout_000.wav"):
        assert recipe.count(f'"{documented}"') >= 1, documented
    recipe = recipe.replace('"workdir/debug/hf"', repr(str(exported))).replace(
        '"demo_data/clips/heldout_000.wav"', repr(clip))
    namespace = {}
    exec(compile(recipe, "README.md (hf-recipe)", "exec"), namespace)
    answer = capsys.readouterr().out
    _, _, _, expected_tokens, expected = _recipe(exported, clip, max_new_tokens=64)
    assert answer.strip() == expected.strip()
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]  # it generated tokens
