"""Putting the projected audio into the text: row b's k-th `<sound>` slot takes the k-th valid token of
row b's windows (af_next_jax/batch.py: every row owns W / B window slots).

transformers' `masked_scatter` fills the batch's slots read row-major from the valid tokens of all
windows in order; with each row's windows in its own slots that is the same assignment, row by row.

Under a mesh the merge never materialises another row's audio, nor a whole row's: the rows are split
over the batch axes (data x fsdp) and each row's sequence over the sequence axes (ring x ulysses),
and the windows over all of them, batch axes major (parallel/rules.py), so the devices of one batch
block hold both its rows' text and its rows' windows. Each device works out, for each of its
sequence positions, which window of its row holds the position's token and which device of its
sequence group holds that window; then the window blocks of the group travel once around it (a ring of
`ppermute`s over the sequence axes), and each device picks the tokens it needs from each block as it
passes (`_ring_gather`). The backward sends a cotangent accumulator around the same ring. Per device:
two window blocks and its own slice of the text, whatever the sequence length and the device count.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from af_next_jax.model import axes
from af_next_jax.parallel.rules import fit_spec


def merge_audio_into_text(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id):
    """[B, L, D]: the text embeddings with every `<sound>` slot replaced by its row's next valid audio token."""
    rows, length, width = text_embeds_BxLxD.shape
    windows, tokens, _ = audio_embeds_NxTxD.shape
    if windows % rows:
        raise ValueError(f"{windows} windows do not split into equal window slots for {rows} rows "
                         f"(af_next_jax/batch.py)")
    layout = _row_local_layout(rows, length, windows)
    if layout is None:
        return _merge_rows(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id)
    return _merge_over_mesh(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id,
                            *layout)


def _merge_rows(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id):
    """The merge as one gather per row (no mesh, or a layout `_row_local_layout` does not cover)."""
    rows, _, width = text_embeds_BxLxD.shape
    windows, tokens, _ = audio_embeds_NxTxD.shape
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


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _row_local_layout(rows: int, length: int, windows: int):
    """(batch axes, sequence axes, window sequence axes) of the ambient mesh and rules when the text is
    split (batch axes, sequence axes) and the windows over the same batch axes then, optionally, the
    same sequence axes: the layouts the rules table gives (parallel/rules.py, with or without
    `shard_windows_over_sequence`). None without a mesh, without any split, or for another layout
    (the per-row gather then, which XLA places)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = dict(nn.get_logical_axis_rules())
    text_spec = fit_spec(P(rules.get(axes.BATCH), rules.get(axes.LENGTH)), (rows, length), mesh)
    batch_axes, sequence_axes = _axes(text_spec[0]), _axes(text_spec[1])
    window_axes = _axes(fit_spec(P(rules.get(axes.WINDOWS)), (windows,), mesh)[0])
    if window_axes == batch_axes + sequence_axes:
        rotate_axes = sequence_axes
    elif window_axes == batch_axes:
        rotate_axes = ()
    else:
        return None
    if not batch_axes and not sequence_axes:
        return None
    return batch_axes, sequence_axes, rotate_axes


def _merge_over_mesh(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id,
                     batch_axes, sequence_axes, rotate_axes):
    mesh = jax.sharding.get_abstract_mesh()
    rows = text_embeds_BxLxD.shape[0]
    windows_per_row = audio_embeds_NxTxD.shape[0] // rows
    # Valid tokens of every window: a few bytes a window, replicated to every device.
    valid_tokens_N = audio_valid_NxT.sum(axis=1, dtype=jnp.int32)
    sequence_devices = math.prod(mesh.shape[axis] for axis in sequence_axes)
    ring = math.prod(mesh.shape[axis] for axis in rotate_axes)

    def per_device(text_bxlxD, token_ids_bxl, audio_nxTxD, valid_tokens_N):
        local_rows, local_length = token_ids_bxl.shape
        window_count, tokens, width = audio_nxTxD.shape
        first_row = jax.lax.axis_index(batch_axes) * local_rows if batch_axes else 0
        slice_index = jax.lax.axis_index(sequence_axes) if sequence_axes else 0
        # The rank of each audio slot in its row: this slice's own count, after the earlier slices'.
        is_audio_bxl = token_ids_bxl == audio_token_id
        local_counts_b = is_audio_bxl.sum(axis=1, dtype=jnp.int32)
        if sequence_axes:
            counts_Sxb = jax.lax.all_gather(local_counts_b, sequence_axes)
            earlier_S = jnp.arange(sequence_devices) < slice_index
            local_counts_b = jnp.sum(jnp.where(earlier_S[:, None], counts_Sxb, 0), axis=0)
        else:
            local_counts_b = jnp.zeros_like(local_counts_b)
        rank_bxl = jnp.maximum(local_counts_b[:, None] + jnp.cumsum(is_audio_bxl, axis=1, dtype=jnp.int32) - 1, 0)
        # The window of the row holding that rank, and the token inside it (valid tokens lead a window).
        row_tokens_bxR = jax.lax.dynamic_slice_in_dim(valid_tokens_N.reshape(rows, windows_per_row), first_row,
                                                      local_rows, axis=0)
        ends_bxR = jnp.cumsum(row_tokens_bxR, axis=1)
        window_bxl = jnp.minimum(jax.vmap(lambda ends, rank: jnp.searchsorted(ends, rank, side="right"))(
            ends_bxR, rank_bxl), windows_per_row - 1)
        token_bxl = rank_bxl - (jnp.take_along_axis(ends_bxR, window_bxl, axis=1)
                                - jnp.take_along_axis(row_tokens_bxR, window_bxl, axis=1))
        # Where that window is: which device of the ring, at which position of its flat block.
        window_in_block_bxl = jnp.arange(local_rows)[:, None] * windows_per_row + window_bxl
        owner_bxl, position_bxl = jnp.divmod(window_in_block_bxl, window_count)
        flat_position_bxl = position_bxl * tokens + jnp.clip(token_bxl, 0, tokens - 1)
        audio_at_slots_bxlxD = _ring_gather(audio_nxTxD.reshape(window_count * tokens, width), owner_bxl,
                                            flat_position_bxl, rotate_axes, ring, window_count * tokens)
        return jnp.where(is_audio_bxl[..., None], audio_at_slots_bxlxD.astype(text_bxlxD.dtype), text_bxlxD)

    text_spec = P(batch_axes or None, sequence_axes or None, None)
    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(text_spec, P(batch_axes or None, sequence_axes or None),
                  P((batch_axes + rotate_axes) or None, None, None), P()),
        out_specs=text_spec, check_vma=False)(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, valid_tokens_N)


def _step(axes, ring: int):
    """Pass a block to the next device of the ring (`axes`, linear index)."""
    return functools.partial(jax.lax.ppermute, axis_name=axes, perm=[(i, (i + 1) % ring) for i in range(ring)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ring_gather(block_MxD, owner_bxl, position_bxl, axes, ring: int, block_rows: int):
    """[b, l, D]: for each local position, row `position` of the [block_rows, D] block of ring device
    `owner`. The blocks go once around the ring; the backward keeps only the indices."""
    return _ring_gather_forward(block_MxD, owner_bxl, position_bxl, axes, ring, block_rows)[0]


def _ring_gather_forward(block_MxD, owner_bxl, position_bxl, axes, ring, block_rows):
    del block_rows
    index = jax.lax.axis_index(axes) if axes else 0

    def pick(hop, block_MxD, out_bxlxD):  # at hop h this device holds the block of device (index - h)
        picked_bxlxD = jnp.take(block_MxD, position_bxl, axis=0, mode="clip")
        return jnp.where((owner_bxl == (index - hop) % ring)[..., None], picked_bxlxD, out_bxlxD)

    # A loop, not unrolled: one block in flight, whatever the ring's length. A while loop (the array bound),
    # not a scan: under a remat policy jax splits a scan and keeps values of every step, stacked.
    def hop(hop, carry):
        block_MxD, out_bxlxD = carry
        return _step(axes, ring)(block_MxD), pick(hop, block_MxD, out_bxlxD)

    out_bxlxD = jnp.zeros(owner_bxl.shape + block_MxD.shape[1:], block_MxD.dtype)
    if ring > 1:
        block_MxD, out_bxlxD = jax.lax.fori_loop(0, jnp.int32(ring - 1), hop, (block_MxD, out_bxlxD))
    return pick(ring - 1, block_MxD, out_bxlxD), (owner_bxl, position_bxl)


def _ring_gather_backward(axes, ring, block_rows, residuals, dout_bxlxD):
    owner_bxl, position_bxl = residuals
    index = jax.lax.axis_index(axes) if axes else 0
    # An accumulator per block travels the forward's way: at hop h this device adds what its positions
    # took from block (index - h); after the full circle each accumulator is back at its block's device.
    width = dout_bxlxD.shape[-1]

    def hop(hop, accumulator_MxD):
        mine_bxlxD = jnp.where((owner_bxl == (index - hop) % ring)[..., None], dout_bxlxD, 0)
        accumulator_MxD = accumulator_MxD.at[position_bxl.reshape(-1)].add(
            mine_bxlxD.reshape(-1, width), mode="drop")
        return _step(axes, ring)(accumulator_MxD) if ring > 1 else accumulator_MxD

    accumulator_MxD = jax.lax.fori_loop(0, jnp.int32(ring), hop, jnp.zeros((block_rows, width), dout_bxlxD.dtype))
    return accumulator_MxD, None, None


_ring_gather.defvjp(_ring_gather_forward, _ring_gather_backward)
