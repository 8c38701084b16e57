"""`python -m af_next_jax.generate` end to end on a tiny converted checkpoint (conftest.py: random
weights, a demo-style tokenizer, two wav files, one over several windows), and its one-line errors."""

import jax
import numpy as np
import pytest

from af_next_jax import generate as generate_cli
from af_next_jax.data.demo import SYSTEM_PROMPT
from af_next_jax.data.manifest import Turn
from af_next_jax.inference.answer import Request, answer_requests
from af_next_jax.inference.decoding import generator_for
from af_next_jax.inference.loading import load_model


def test_cli_prints_the_models_answer(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint / "ckpt"), "--audio", str(checkpoint / "long.wav"),
            "--audio", str(checkpoint / "short.wav"), "--prompt", "At what time does the beep start?",
            "--max-new-tokens", "12"]
    assert generate_cli.main(args) == 0
    printed = capsys.readouterr().out.strip()
    loaded = load_model(checkpoint=str(checkpoint / "ckpt"))
    turns = (Turn("system", SYSTEM_PROMPT), Turn("user", "<sound><sound>\nAt what time does the beep start?"))
    request = Request((str(checkpoint / "long.wav"), str(checkpoint / "short.wav")), turns)
    (expected,) = answer_requests(loaded, generator_for(loaded.config), [request], max_new_tokens=12)
    assert expected.num_tokens > 0 and printed == expected.answer


def test_cli_think_variant_opens_the_chain(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint / "ckpt"), "--audio", str(checkpoint / "short.wav"),
            "--prompt", "Which comes first?", "--variant", "think", "--max-new-tokens", "6"]
    assert generate_cli.main(args) == 0
    assert capsys.readouterr().out.startswith("<think>")


@pytest.mark.parametrize("problem", ["missing_checkpoint", "missing_audio", "not_audio", "no_prompt"])
def test_bad_input_is_a_one_line_error(checkpoint, capsys, problem):
    ckpt, audio = str(checkpoint / "ckpt"), str(checkpoint / "short.wav")
    if problem == "missing_checkpoint":
        ckpt = str(checkpoint / "nope")
    elif problem == "missing_audio":
        audio = str(checkpoint / "nope.wav")
    elif problem == "not_audio":
        audio = str(checkpoint / "tokenizer.json")
    args = ["--checkpoint", ckpt, "--audio", audio, "--prompt", "" if problem == "no_prompt" else "Hi?"]
    assert generate_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err


def test_hf_dir_answers_like_the_checkpoint_it_was_exported_from(checkpoint, capsys, tmp_path):
    """`--hf-dir` reads through the converter's importer: an HF export of the checkpoint (float32)
    gives the same answer."""
    from af_next_jax.convert.cli import main as convert_main

    hf_dir = tmp_path / "hf"
    assert convert_main(["to-hf", "--checkpoint", str(checkpoint / "ckpt"), "--out", str(hf_dir), "--dtype",
                         "float32", "--tokenizer-dir", str(checkpoint), "--quiet"]) == 0
    question = ["--audio", str(checkpoint / "long.wav"), "--prompt", "When?", "--max-new-tokens", "8"]
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", str(checkpoint / "ckpt")] + question) == 0
    from_checkpoint = capsys.readouterr().out
    assert generate_cli.main(["--hf-dir", str(hf_dir)] + question) == 0
    assert capsys.readouterr().out == from_checkpoint
    # Random tiny weights answer mostly from the text, so also compare what was loaded.
    ours, imported = load_model(checkpoint=str(checkpoint / "ckpt")), load_model(hf_dir=str(hf_dir))
    # The architecture round-trips; max_windows_per_audio and compute_dtype are not in an HF config.
    for part in ("encoder", "rote", "projector", "decoder", "audio_token_id", "audio_bos_token_id"):
        assert getattr(imported.config, part) == getattr(ours.config, part), part
    for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(ours.params)):
        np.testing.assert_array_equal(a, b)
