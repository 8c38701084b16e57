"""Validation of a checkpoint against the rules: keys and shapes, with messages naming them."""

from __future__ import annotations

import jax
import flax.linen as nn

from af_next_jax.batch import zeros_batch
from af_next_jax.config import ModelConfig
from af_next_jax.convert.errors import BadInputError


def check_keys(present: set[str], rules) -> None:
    expected = {key for rule in rules for key in rule.hf_keys()}
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if missing:
        raise BadInputError(f"checkpoint is missing {len(missing)} tensor(s), first: {missing[0]!r}"
                            + (f" (and {missing[1:4]})" if len(missing) > 1 else ""))
    if unexpected:
        raise BadInputError(f"checkpoint has {len(unexpected)} unexpected tensor(s), first: {unexpected[0]!r}"
                            + (f" (and {unexpected[1:4]})" if len(unexpected) > 1 else ""))


def expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of every parameter of a model with this config (abstract init: no memory used)."""
    from af_next_jax.model.af_next import AFNextModel
    # Shapes do not depend on how attention runs; a run's sequence parallelism would need its mesh.
    config = config.replace(attention_kernel="xla", sequence_parallelism="none")
    batch = zeros_batch(config, batch_size=1, seq_len=8, num_windows=1)
    abstract = jax.eval_shape(AFNextModel(config).init, jax.random.key(0), batch)
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract)["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
