"""Smoke run: build a model preset, count its parameters and run one forward pass on a synthetic batch.

    python -m af_next_jax.smoke [--preset tiny]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import flax.linen as nn

from af_next_jax.config import PRESETS, preset
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    config = preset(args.preset)
    frames = config.encoder.mel_frames_per_window
    batch = synthetic_batch(config, audio_frames_per_example=[[frames + frames // 3], []],
                            seq_len=2 * config.encoder.tokens_per_window + 64)
    model = AFNextModel(config)
    params = jax.jit(model.init)(jax.random.key(0), batch)
    counts = {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in nn.unbox(params)["params"].items()}
    start = time.perf_counter()
    logits = jax.jit(model.apply)(params, batch).block_until_ready()
    seconds = time.perf_counter() - start
    print(f"preset {args.preset}: {sum(counts.values()):,} parameters "
          + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    print(f"forward pass (compile + run) {seconds:.1f}s: logits {logits.shape} {logits.dtype}, "
          f"finite={bool(np.isfinite(np.asarray(logits, np.float32)).all())}")


if __name__ == "__main__":
    main()
