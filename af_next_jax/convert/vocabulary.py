"""Resize the decoder's vocabulary (embed_tokens rows, lm_head columns) to a preset's size.

Qwen2.5-7B has 152,064 rows for a tokenizer that uses 151,665 ids: the rest is padding (to a
multiple of 128) that no token selects, so those embedding rows never received a gradient and those
lm_head columns were only ever pushed down by the softmax. AF-Next has 151,672 rows. Rules:

  - rows of ids the source tokenizer uses (0 .. used_rows - 1) are kept bit for bit;
  - every other row of the target, the new special tokens' rows included, is set to the **mean of
    the used rows** (separately for embed_tokens and lm_head): the common initialisation of added
    tokens (transformers' `resize_token_embeddings(mean_resizing=True)` uses the mean as the centre
    of its distribution; we take the mean itself, deterministic). A new token then starts as an
    "average" token: its logit is the mean logit and its embedding the centroid, not a random
    direction with an arbitrary norm, so the first steps of stage 1 are not disturbed;
  - rows at ids >= the target size are dropped only when no token uses them: a target smaller
    than `used_rows` is refused (BadInputError) before any tensor is read.
"""

from __future__ import annotations

import numpy as np

from af_next_jax.convert.errors import BadInputError
from af_next_jax.convert.orbax_io import aligned_empty

# Parameter of the decoder -> its vocabulary axis (embed_tokens [V, D]; lm_head stored as [D, V]).
VOCAB_AXIS = {"embed_tokens": 0, "lm_head": 1}


def check_resizable(used_rows: int, source_rows: int, target_rows: int, where: str) -> None:
    if used_rows > source_rows:
        raise BadInputError(f"{where}: the tokenizer uses {used_rows} ids but the checkpoint has only "
                            f"{source_rows} embedding rows; tokenizer and weights do not belong together")
    if target_rows < used_rows:
        raise BadInputError(f"{where}: the preset's vocab_size {target_rows} would drop rows "
                            f"{target_rows}..{used_rows - 1}, which the tokenizer uses (it has {used_rows} ids); "
                            f"use a preset with vocab_size >= {used_rows}")


def resize_rows(table: np.ndarray, axis: int, used_rows: int, target_rows: int) -> np.ndarray:
    """`table` with its vocabulary `axis` resized to `target_rows` (see the module docstring)."""
    used = np.moveaxis(table, axis, 0)[:used_rows]
    mean = used.mean(axis=0, dtype=np.float64).astype(table.dtype)
    shape = list(table.shape)
    shape[axis] = target_rows
    out = aligned_empty(tuple(shape), table.dtype)
    out_rows = np.moveaxis(out, axis, 0)  # a view: writing it fills `out`
    out_rows[:used_rows] = used
    out_rows[used_rows:] = mean
    return out


def resize_vocabulary(decoder: dict, used_rows: int, target_rows: int) -> tuple[dict, dict]:
    """(decoder params with resized embed_tokens / lm_head, a summary of what changed)."""
    source_rows = decoder["embed_tokens"].shape[0]
    check_resizable(used_rows, source_rows, target_rows, "vocabulary")
    resized = dict(decoder)
    for name, axis in VOCAB_AXIS.items():
        if name in decoder:  # a tied model has no lm_head
            resized[name] = resize_rows(decoder[name], axis, used_rows, target_rows)
    summary = {"source_rows": source_rows, "target_rows": target_rows, "tokenizer_ids": used_rows,
               "mean_initialised_rows": [used_rows, target_rows - 1] if target_rows > used_rows else None,
               "dropped_unused_rows": [target_rows, source_rows - 1] if source_rows > target_rows else None}
    return resized, summary
