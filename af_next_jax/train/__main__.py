"""`python -m af_next_jax.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.key=value ...]`.

Running the same command again resumes from the newest checkpoint in DIR.
Exit codes: 0 finished or preempted (saved), 3 stopped by non-finite losses.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiments/NAME.py or experiments/NAME.py:ARG")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard and logs go here")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.optimizer.learning_rate=1e-4")
        overrides.append(item)

    from af_next_jax.train.experiment import load_config
    from af_next_jax.train.loop import NonFiniteLossError, train

    config = load_config(args.config, overrides)
    try:
        result = train(config, args.workdir)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(f"{result.status} at step {result.step}; final loss {result.final_loss}; workdir {result.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
