"""Putting the projected audio into the text: row b's k-th `<sound>` slot takes the k-th valid token of
row b's windows (af_next_jax/batch.py: every row owns W / B window slots).

transformers' `masked_scatter` fills the batch's slots read row-major from the valid tokens of all
windows in order; with each row's windows in its own slots that is the same assignment, row by row.

Under a mesh the merge never materialises another row's audio, nor a whole row's: the rows are split
over the batch axes (data x fsdp) and each row's sequence over the sequence axes (ring x ulysses),
and the windows over all of them, batch axes major (parallel/rules.py), so the devices of one batch
block hold both its rows' text and its rows' windows. Each device works out, for each of its
sequence positions, which window of its row holds the position's token and which device of its
sequence group holds that window; then the window blocks travel right around the group (`ppermute`s
over the sequence axes) as far as the farthest position needs, and each device picks the tokens it
needs from each block as it passes (`_ring_gather`). The backward sends cotangent accumulators back
the same way. Per device: a few window blocks and its own slice of the text, whatever the sequence
length and the device count.

How far the blocks travel depends on where the windows sit. When a row's slots split into one block
per slice of the row (`slot_blocks`), the devices first swap blocks so that device s holds block s of
each of its rows (`_transpose_blocks`: each device sends its own windows once); the data pipeline puts
each window in the block of the slice holding its first `<sound>` token (data/packing.py), so a window
is on the device of its first token or, when it straddles, on the left neighbour: one hop (when no
window is longer than a slice). Windows elsewhere still merge exactly, with more hops.
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


def slot_blocks(rows: int, length: int, windows: int) -> int:
    """How many equal blocks each row's window slots form under the ambient mesh and rules: the devices
    of a sequence group when the windows are split over it (and a row's slots divide by that count),
    else 1. Block s of a row belongs to the s-th slice of the row's text: a host that puts each window
    in the block of the slice holding the window's first `<sound>` token (data/packing.py) lets the
    merge fetch every window from the device itself or its left neighbour (windows no longer than a
    slice). Any order of the row's windows stays correct; the block order only makes it cheap."""
    layout = _row_local_layout(rows, length, windows)
    if layout is None or not layout[2]:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    group = math.prod(mesh.shape[axis] for axis in layout[2])
    return group if (windows // rows) % group == 0 else 1


def _merge_over_mesh(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, audio_valid_NxT, audio_token_id,
                     batch_axes, sequence_axes, rotate_axes):
    mesh = jax.sharding.get_abstract_mesh()
    rows, length = token_ids_BxL.shape
    windows_per_row = audio_embeds_NxTxD.shape[0] // rows
    # Valid tokens of every window: a few bytes a window, replicated to every device.
    valid_tokens_N = audio_valid_NxT.sum(axis=1, dtype=jnp.int32)
    sequence_devices = math.prod(mesh.shape[axis] for axis in sequence_axes)
    ring = math.prod(mesh.shape[axis] for axis in rotate_axes)
    blocks = slot_blocks(rows, length, audio_embeds_NxTxD.shape[0])

    def per_device(text_bxlxD, token_ids_bxl, audio_nxTxD, valid_tokens_N):
        local_rows, local_length = token_ids_bxl.shape
        window_count, tokens, width = audio_nxTxD.shape
        first_row = jax.lax.axis_index(batch_axes) * local_rows if batch_axes else 0
        slice_index = jax.lax.axis_index(sequence_axes) if sequence_axes else 0
        ring_index = jax.lax.axis_index(rotate_axes) if rotate_axes else 0
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
        # Where that window is: which device of the ring, at which position of its block.
        if blocks > 1:  # after the transpose, device s holds block s of each of its rows
            audio_nxTxD = _transpose_blocks(audio_nxTxD, local_rows, rotate_axes, ring)
            owner_bxl, slot_bxl = jnp.divmod(window_bxl, windows_per_row // blocks)
            position_bxl = jnp.arange(local_rows)[:, None] * (windows_per_row // blocks) + slot_bxl
        else:
            window_in_block_bxl = jnp.arange(local_rows)[:, None] * windows_per_row + window_bxl
            owner_bxl, position_bxl = jnp.divmod(window_in_block_bxl, window_count)
        owner_bxl = jnp.where(is_audio_bxl, owner_bxl, ring_index)  # text positions wait for no block
        flat_position_bxl = position_bxl * tokens + jnp.clip(token_bxl, 0, tokens - 1)
        audio_at_slots_bxlxD = _ring_gather(audio_nxTxD.reshape(window_count * tokens, width), owner_bxl,
                                            flat_position_bxl, rotate_axes, ring, window_count * tokens,
                                            tuple(mesh.axis_names))
        return jnp.where(is_audio_bxl[..., None], audio_at_slots_bxlxD.astype(text_bxlxD.dtype), text_bxlxD)

    text_spec = P(batch_axes or None, sequence_axes or None, None)
    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(text_spec, P(batch_axes or None, sequence_axes or None),
                  P((batch_axes + rotate_axes) or None, None, None), P()),
        out_specs=text_spec, check_vma=False)(text_embeds_BxLxD, token_ids_BxL, audio_embeds_NxTxD, valid_tokens_N)


def _transpose_blocks(audio_nxTxD, local_rows: int, axes, ring: int):
    """[n, T, D] -> [n, T, D]: device t of the ring holds blocks t R .. t R + R - 1 (R = local_rows) of
    its rows' slot blocks, numbered row * ring + block; afterwards device s holds block s of every row,
    row-major. R rounds of one `ppermute` each: every device sends and receives one block a round, so
    a device moves its own windows once, whatever the ring's length."""
    window_count = audio_nxTxD.shape[0]
    held_Rxk = audio_nxTxD.reshape(local_rows, window_count // local_rows, *audio_nxTxD.shape[1:])
    rounds = _block_transpose_rounds(local_rows, ring)
    if all(pairs == [(t, t) for t in range(ring)] and list(sent) == list(placed)
           for sent, placed, pairs in rounds):
        return audio_nxTxD  # one row a device: its blocks are already where they belong
    index = jax.lax.axis_index(axes)
    gathered_Rxk = jnp.zeros_like(held_Rxk)
    for sent_slot, placed_slot, pairs in rounds:
        block_1xk = jax.lax.dynamic_slice_in_dim(held_Rxk, jnp.asarray(sent_slot)[index], 1, axis=0)
        received_1xk = jax.lax.ppermute(block_1xk, axes, perm=pairs)
        gathered_Rxk = jax.lax.dynamic_update_slice_in_dim(gathered_Rxk, received_1xk,
                                                          jnp.asarray(placed_slot)[index], axis=0)
    return gathered_Rxk.reshape(audio_nxTxD.shape)


@functools.lru_cache(maxsize=None)
def _block_transpose_rounds(local_rows: int, ring: int):
    """[(slot each device sends, slot each device fills, ppermute pairs)] for `_transpose_blocks`: block
    g = t R + u (slot u of device t) is row g // ring's block g % ring and goes to device g % ring, slot
    g // ring. Every device sends R blocks and receives R, so the moves split into R rounds in which each
    device sends one and receives one (a regular bipartite multigraph is a union of perfect matchings);
    each round is one augmenting-path matching of the moves left."""
    left = {t: [(u, *divmod(t * local_rows + u, ring)) for u in range(local_rows)] for t in range(ring)}
    rounds = []
    for _ in range(local_rows):
        source_of = {}  # target device -> (source device, its slot, the row)

        def augment(source, seen):
            for slot, row, target in left[source]:
                if target in seen:
                    continue
                seen.add(target)
                if target not in source_of or augment(source_of[target][0], seen):
                    source_of[target] = (source, slot, row)
                    return True
            return False

        for source in range(ring):
            if not augment(source, set()):
                raise AssertionError(f"no perfect matching for {local_rows} rows over a ring of {ring}")
        sent, placed, pairs = [0] * ring, [0] * ring, []
        for target, (source, slot, row) in sorted(source_of.items()):
            sent[source], placed[target] = slot, row
            pairs.append((source, target))
            left[source].remove((slot, row, target))
        rounds.append((tuple(sent), tuple(placed), sorted(pairs)))
    return tuple(rounds)


def _step(axes, ring: int, shift: int = 1):
    """Pass a block `shift` devices along the ring (`axes`, linear index)."""
    return functools.partial(jax.lax.ppermute, axis_name=axes, perm=[(i, (i + shift) % ring) for i in range(ring)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ring_gather(block_MxD, owner_bxl, position_bxl, axes, ring: int, block_rows: int, all_axes):
    """[b, l, D]: for each local position, row `position` of the [M, D] block of ring device `owner`.
    The blocks travel right as far as the farthest position needs ((own index - owner) mod ring hops,
    the most over every device: the loop's length must agree everywhere); the backward keeps only the
    indices and the hop count."""
    return _ring_gather_forward(block_MxD, owner_bxl, position_bxl, axes, ring, block_rows, all_axes)[0]


def _hops_needed(owner_bxl, axes, ring, all_axes):
    if ring == 1:
        return jnp.int32(0)
    index = jax.lax.axis_index(axes)
    return jax.lax.pmax(jnp.max((index - owner_bxl) % ring, initial=0), all_axes)


def _ring_gather_forward(block_MxD, owner_bxl, position_bxl, axes, ring, block_rows, all_axes):
    del block_rows
    index = jax.lax.axis_index(axes) if axes else 0
    hops = _hops_needed(owner_bxl, axes, ring, all_axes)

    def pick(hop, block_MxD, out_bxlxD):  # at hop h this device holds the block of device (index - h)
        picked_bxlxD = jnp.take(block_MxD, position_bxl, axis=0, mode="clip")
        return jnp.where((owner_bxl == (index - hop) % ring)[..., None], picked_bxlxD, out_bxlxD)

    # A while loop as long as the data needs (one hop when every window sits in the block of its first
    # token's slice, data/packing.py): one block in flight, whatever the ring's length. Not a scan:
    # under a remat policy jax splits a scan and keeps values of every step, stacked.
    def hop(hop, carry):
        block_MxD, out_bxlxD = carry
        return _step(axes, ring)(block_MxD), pick(hop, block_MxD, out_bxlxD)

    out_bxlxD = jnp.zeros(owner_bxl.shape + block_MxD.shape[1:], block_MxD.dtype)
    if ring > 1:
        block_MxD, out_bxlxD = jax.lax.fori_loop(0, hops, hop, (block_MxD, out_bxlxD))
    return pick(hops, block_MxD, out_bxlxD), (owner_bxl, position_bxl, hops)


def _ring_gather_backward(axes, ring, block_rows, all_axes, residuals, dout_bxlxD):
    owner_bxl, position_bxl, hops = residuals
    index = jax.lax.axis_index(axes) if axes else 0
    width = dout_bxlxD.shape[-1]

    # The forward sent block j to devices j .. j + hops. An accumulator per block travels back the
    # other way: it starts on device j + hops and at hop h, on device k, takes what k's positions took
    # from block (k - hops + h); after `hops` steps left it rests on block j's own device.
    def add(hop, accumulator_MxD):
        mine_bxlxD = jnp.where((owner_bxl == (index - hops + hop) % ring)[..., None], dout_bxlxD, 0)
        return accumulator_MxD.at[position_bxl.reshape(-1)].add(mine_bxlxD.reshape(-1, width), mode="drop")

    accumulator_MxD = jnp.zeros((block_rows, width), dout_bxlxD.dtype)
    if ring > 1:
        accumulator_MxD = jax.lax.fori_loop(0, hops, lambda hop, accumulator_MxD: _step(axes, ring, -1)(
            add(hop, accumulator_MxD)), accumulator_MxD)
    return add(hops, accumulator_MxD), None, None


_ring_gather.defvjp(_ring_gather_forward, _ring_gather_backward)
