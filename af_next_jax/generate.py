"""Ask a trained model about audio.

    python -m af_next_jax.generate --checkpoint workdir/debug --audio demo_data/clips/heldout_000.wav \
        --prompt "At what time does the beep start?" [--variant think] [--max-new-tokens 64]

`--checkpoint` takes a converted checkpoint or a training workdir (`--step N` for a saved step);
`--hf-dir` an HF MusicFlamingo / AF3 / AF-Next directory. The prompt is in the model's own chat format
(a released checkpoint's chat template, with its default system prompt; ChatML with the demo data's
system prompt for models trained here: af_next_jax/inference/prompts.py), and the model computes in
the checkpoint's dtype unless `--dtype` says otherwise (af_next_jax/inference/loading.py). Prints the
answer, and the `<think>` chain first when there is one. Bad input (a missing checkpoint, unreadable
audio, no tokenizer) is one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from af_next_jax.config import COMPUTE_DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.generate", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="converted checkpoint or training workdir")
    source.add_argument("--hf-dir", help="Hugging Face MusicFlamingo / AF3 / AF-Next directory")
    parser.add_argument("--step", type=int, help="a saved training step of a workdir (default: its export)")
    parser.add_argument("--tokenizer", help="tokenizer.json or .model (default: found beside the model)")
    parser.add_argument("--audio", action="append", default=[], help="an audio file; repeat for several")
    parser.add_argument("--prompt", default="", help="the question (captioner: may be empty)")
    parser.add_argument("--variant", default="instruct", choices=["instruct", "think", "captioner"])
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the model's: the demo data's for models trained here; a "
                             "checkpoint's own chat template adds its default); '' for none (a template's "
                             "default still applies, as in transformers)")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling key")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # first, before JAX starts: XLA flags, allocator, platforms (process_setup.py)
    args = parse_args(argv)
    from af_next_jax.convert.errors import BadInputError
    from af_next_jax.data.audio import AudioError

    try:
        return _run(args)
    except (BadInputError, AudioError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import jax

    from af_next_jax.inference.answer import Request, answer_requests
    from af_next_jax.inference.decoding import generator_for
    from af_next_jax.inference.loading import load_model
    from af_next_jax.inference.prompts import default_system_prompt, load_audio_input, model_chat_template, prompt_turns
    from af_next_jax.inference.sampling import SamplingConfig
    from af_next_jax.convert.errors import BadInputError

    if args.max_new_tokens <= 0:
        raise BadInputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not args.prompt and args.variant != "captioner":
        raise BadInputError("--prompt is empty; ask a question (only --variant captioner has a default)")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    loaded = load_model(checkpoint=args.checkpoint, hf_dir=args.hf_dir, step=args.step, tokenizer=args.tokenizer,
                        dtype=args.dtype)
    # Featurised once, before compiling anything: bad audio fails fast.
    audios = [load_audio_input(path, loaded.config) for path in args.audio]
    system = default_system_prompt(model_chat_template(loaded.tokenizer)) if args.system is None else args.system
    turns = prompt_turns(args.prompt, len(args.audio), variant=args.variant, system=system or None)
    request = Request(tuple(args.audio), tuple(turns), args.variant)
    (answer,) = answer_requests(loaded, generator_for(loaded.config), [request], max_new_tokens=args.max_new_tokens,
                                sampling=sampling, key=jax.random.key(args.seed), audios=[audios])
    if answer.think is not None:
        print(f"<think>{answer.think}</think>")
    print(answer.answer)
    if not answer.stopped:
        print(f"(stopped at --max-new-tokens {args.max_new_tokens})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
