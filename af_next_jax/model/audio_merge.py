"""Putting the projected audio into the text: row b's k-th `<sound>` slot takes the k-th valid token of
row b's windows (af_next_jax/batch.py: every row owns W / B window slots).

transformers' `masked_scatter` fills the batch's slots read row-major from the valid tokens of all
windows in order; with each row's windows in its own slots that is the same assignment, row by row.
Written per row, nothing crosses rows: the merge of a row needs only that row's audio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_audio_into_text(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id):
    """[B, L, D]: the text embeddings with every `<sound>` slot replaced by its row's next valid audio token."""
    rows, _, width = text_embeds_BxLxD.shape
    windows, tokens, _ = audio_embeds_NxTxD.shape
    if windows % rows:
        raise ValueError(f"{windows} windows do not split into equal window slots for {rows} rows "
                         f"(af_next_jax/batch.py)")
    slots = windows // rows * tokens  # audio positions a row owns
    audio_BxMxD = audio_embeds_NxTxD.reshape(rows, slots, width)
    valid_BxM = audio_valid_NxT.reshape(rows, slots)
    # Where each row's valid tokens sit among its audio positions, in order (padding after the last).
    valid_source_BxM = jax.vmap(lambda valid_M: jnp.nonzero(valid_M, size=slots, fill_value=0)[0])(valid_BxM)
    is_audio_BxL = token_ids_BxL == audio_token_id
    slot_rank_BxL = jnp.clip(jnp.cumsum(is_audio_BxL, axis=1) - 1, 0, slots - 1)
    source_BxL = jnp.take_along_axis(valid_source_BxM, slot_rank_BxL, axis=1)
    audio_at_slots_BxLxD = jnp.take_along_axis(audio_BxMxD, source_BxL[..., None], axis=1)
    return jnp.where(is_audio_BxL[..., None], audio_at_slots_BxLxD.astype(text_embeds_BxLxD.dtype), text_embeds_BxLxD)
