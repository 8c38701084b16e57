"""model/audio_merge.py: the merge over a mesh equals the per-row merge and the old global merge (values
and gradients), and a compiled train step never moves the global audio table or the global embeddings.

The old merge (before each row owned its window slots) gathered from one flat table of the batch's
valid tokens: `global_merge` below is that algorithm, the reference the new one must equal on a batch
laid out per row (the batch contract, af_next_jax/batch.py).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.model import audio_merge
from af_next_jax.parallel import MeshConfig, logical_axis_rules, make_mesh

AUDIO = 7
ROWS, LENGTH, SLOTS, TOKENS, WIDTH = 8, 64, 4, 6, 5


def global_merge(text_BxLxD, token_ids_BxL, audio_NxTxD, valid_NxT, audio_token_id):
    """The k-th `<sound>` slot of the batch, read row-major, takes the k-th valid token of all windows."""
    windows, tokens, width = audio_NxTxD.shape
    flat_MxD = audio_NxTxD.reshape(windows * tokens, width)
    source_M = jnp.nonzero(valid_NxT.reshape(-1), size=windows * tokens, fill_value=0)[0]
    is_audio_BxL = token_ids_BxL == audio_token_id
    rank_BxL = jnp.clip((jnp.cumsum(is_audio_BxL.reshape(-1)) - 1).reshape(is_audio_BxL.shape), 0, windows * tokens - 1)
    return jnp.where(is_audio_BxL[..., None], jnp.take(flat_MxD, source_M[rank_BxL], axis=0), text_BxLxD)


def random_rows(seed: int):
    """Rows with 0..SLOTS windows each (valid tokens leading every window), their <sound> runs placed at
    random in the row, text elsewhere."""
    rng = np.random.default_rng(seed)
    valid_tokens = np.zeros(ROWS * SLOTS, np.int32)
    token_ids = rng.integers(10, 50, (ROWS, LENGTH)).astype(np.int32)
    for row in range(ROWS):
        counts = rng.integers(1, TOKENS + 1, rng.integers(0, SLOTS + 1))
        valid_tokens[row * SLOTS:row * SLOTS + len(counts)] = counts
        start = rng.integers(0, LENGTH - counts.sum() + 1)
        token_ids[row, start:start + counts.sum()] = AUDIO
    valid = np.arange(TOKENS)[None, :] < valid_tokens[:, None]
    audio = rng.normal(size=(ROWS * SLOTS, TOKENS, WIDTH)).astype(np.float32)
    text = rng.normal(size=(ROWS, LENGTH, WIDTH)).astype(np.float32)
    return text, token_ids, audio, valid


def value_and_gradients(merge, text, token_ids, audio, valid, weights):
    """(the merged embeddings, the gradients of <merged, weights> for the text and the audio)."""
    def merged_and_gradients(t, a):
        merged, pullback = jax.vjp(lambda t, a: merge(t, token_ids, a, valid, AUDIO), t, a)
        return merged, pullback(weights)
    return jax.jit(merged_and_gradients)(text, audio)


MESHES = {"fsdp2 ring2 ulysses2": dict(fsdp=2, ring=2, ulysses=2), "ring4 ulysses2": dict(fsdp=1, ring=4, ulysses=2),
          "fsdp8": dict(fsdp=8), "data2 ring4": dict(data=2, fsdp=1, ring=4)}


@pytest.mark.parametrize("windows_over_sequence", [True, False])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_the_merge_over_a_mesh_equals_the_old_global_merge(mesh_name, windows_over_sequence):
    text, token_ids, audio, valid = random_rows(0)
    weights = np.random.default_rng(1).normal(size=text.shape).astype(np.float32)
    expected = value_and_gradients(global_merge, text, token_ids, audio, valid, weights)
    per_row = value_and_gradients(audio_merge.merge_audio_into_text, text, token_ids, audio, valid, weights)
    mesh_config = MeshConfig(**{"fsdp": 1, **MESHES[mesh_name]}, shard_windows_over_sequence=windows_over_sequence)
    with jax.set_mesh(make_mesh(mesh_config)), nn.logical_axis_rules(logical_axis_rules(mesh_config)):
        assert audio_merge._row_local_layout(ROWS, LENGTH, ROWS * SLOTS) is not None  # the sharded path runs
        sharded = value_and_gradients(audio_merge.merge_audio_into_text, text, token_ids, audio, valid, weights)
    for name, result in (("per row", per_row), ("over the mesh", sharded)):
        np.testing.assert_array_equal(result[0], expected[0], err_msg=f"{name}: merged embeddings")
        for got, want, what in zip(result[1], expected[1], ("text", "audio")):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: gradient of the {what}")


def test_a_row_never_takes_another_rows_audio():
    """Row 1's windows are padding: a merge reading the batch row-major would hand row 1 row 2's tokens."""
    text, token_ids, audio, valid = random_rows(2)
    merged = np.asarray(audio_merge.merge_audio_into_text(text, token_ids, audio, valid, AUDIO))
    for row in range(ROWS):
        taken = merged[row][token_ids[row] == AUDIO]
        own = audio[row * SLOTS:(row + 1) * SLOTS][valid[row * SLOTS:(row + 1) * SLOTS]]
        np.testing.assert_array_equal(taken, own)


def packed_rows(slot_blocks: int, rows: int = ROWS, seed: int = 3):
    """`rows` rows of LENGTH tokens packed by the pipeline's BatchBuilder from random examples (text, one
    audio of 1-3 windows of 1-TOKENS tokens, text; those that fit), 16 window slots a row: a merge input."""
    from af_next_jax.config import encoder_tokens_for_frames
    from af_next_jax.data.packing import BatchBuilder

    rng = np.random.default_rng(seed)
    slots = 16
    builder = BatchBuilder(rows, LENGTH, rows * slots, (1, 1), pad_id=0, audio_token_id=AUDIO,
                           slot_blocks=slot_blocks)
    for _ in range(100):
        frames = rng.choice([3, 7, 11, 15, 19, 23], rng.integers(1, 4))  # 1..6 encoder tokens each
        sound = int(encoder_tokens_for_frames(frames).sum())
        ids = np.concatenate([rng.integers(10, 50, rng.integers(1, 8)), np.full(sound, AUDIO),
                              rng.integers(10, 50, rng.integers(1, 4))]).astype(np.int32)
        example = {"token_ids": ids, "trainable": np.ones(len(ids), bool), "mel": np.zeros((len(frames), 1, 1)),
                   "valid_frames": frames.astype(np.int32), "window_index": np.arange(len(frames)),
                   "truncated_audio": 0}
        builder.try_add(example)
    batch = builder.build()
    valid = np.arange(TOKENS)[None, :] < encoder_tokens_for_frames(batch["mel_valid_frames"])[:, None]
    audio = rng.normal(size=(*valid.shape, WIDTH)).astype(np.float32)
    text = rng.normal(size=(rows, LENGTH, WIDTH)).astype(np.float32)
    return text, batch["token_ids"], audio, valid


# (mesh, rows): 4 rows a device over 4 slices, and 4 rows a device over 8 slices (fewer rows than slices).
SLICED_MESHES = {"fsdp2 ring2 ulysses2": (dict(fsdp=2, ring=2, ulysses=2), 8),
                 "ring4 ulysses2": (dict(fsdp=1, ring=4, ulysses=2), 4)}


@pytest.mark.parametrize("mesh_name", sorted(SLICED_MESHES))
def test_windows_in_the_block_of_their_slice_come_from_one_hop_away(monkeypatch, mesh_name):
    """Packed into one block per slice of the row (data/packing.py), every window a device needs is its
    own or its left neighbour's (no window is longer than a slice): the merge's loop runs one hop, and
    equals the old global merge; packed with each row's windows first, it runs more."""
    hops = []
    counted = audio_merge._hops_needed

    def recording(*args):
        needed = counted(*args)
        jax.debug.callback(lambda value: hops.append(int(value)), needed)
        return needed

    monkeypatch.setattr(audio_merge, "_hops_needed", recording)
    sizes, rows = SLICED_MESHES[mesh_name]
    mesh_config = MeshConfig(**sizes)
    slices = sizes["ring"] * sizes["ulysses"]
    most = {}
    for slot_blocks in (slices, 1):
        text, token_ids, audio, valid = packed_rows(slot_blocks, rows)
        weights = np.random.default_rng(1).normal(size=text.shape).astype(np.float32)
        expected = value_and_gradients(global_merge, text, token_ids, audio, valid, weights)
        hops.clear()
        with jax.set_mesh(make_mesh(mesh_config)), nn.logical_axis_rules(logical_axis_rules(mesh_config)):
            assert audio_merge.slot_blocks(rows, LENGTH, len(audio)) == slices
            sharded = value_and_gradients(audio_merge.merge_audio_into_text, text, token_ids, audio, valid, weights)
            jax.effects_barrier()
        most[slot_blocks] = max(hops)
        np.testing.assert_array_equal(sharded[0], expected[0])
        for got, want in zip(sharded[1], expected[1]):
            np.testing.assert_array_equal(got, want)
    assert most[slices] == 1 and most[1] > 1, most


@pytest.mark.parametrize("rows, ring", [(1, 4), (2, 4), (4, 4), (8, 16), (8, 64), (16, 4), (3, 6)])
def test_the_block_swap_rounds_move_every_block_once_to_its_slice(rows, ring):
    """Block g = t R + u of device t (slot u) belongs on device g % ring at slot g // ring; each round is
    a permutation of the ring (every device sends one block and receives one)."""
    arrived = {}
    for sent, placed, pairs in audio_merge._block_transpose_rounds(rows, ring):
        assert sorted(source for source, _ in pairs) == sorted(target for _, target in pairs) == list(range(ring))
        for source, target in pairs:
            block = source * rows + sent[source]
            assert (target, placed[target]) == (block % ring, block // ring)
            arrived[block] = arrived.get(block, 0) + 1
    assert arrived == {block: 1 for block in range(rows * ring)}


def _largest_activation_collective(demo_data, merge=None, monkeypatch=None):
    """(elements of the largest array any collective of the compiled train step returns, elements of one
    row's audio or one row's embeddings, whichever is smaller): long_context_debug (FSDP 2 x ring 2 x
    Ulysses 2 on 8 fake CPU devices) with 16 windows and 2048 tokens a row, so that a row's audio
    (16 x 125 tokens x 64) and a row's embeddings (2048 x 64) outgrow every parameter (at most 1024 x 64)."""
    import re

    from af_next_jax.compile.report import collective_ops
    from af_next_jax.experiment import build_program, experiment_from, load_config

    if merge is not None:
        monkeypatch.setattr("af_next_jax.model.af_next.merge_audio_into_text", merge)
    config = load_config("experiments/long_context_debug.py", [
        f"--config.data.dir={demo_data}", "--config.data.max_windows_per_batch=32", "--config.data.seq_len=2048"])
    experiment = experiment_from(config)
    model, data = experiment.model, config.data
    width = model.decoder.hidden_size
    one_row = min(data.max_windows_per_batch // data.batch_size * model.encoder.tokens_per_window, data.seq_len) * width
    assert one_row > model.decoder.vocab_size * width  # the largest parameter
    hlo = build_program(experiment).lower("train").compile().as_text()
    largest = max(math.prod(int(d) for d in dims.split(",") if d)
                  for _, _, shape in collective_ops(hlo) for dims in re.findall(r"\[([\d,]*)\]", shape))
    return largest, one_row


def test_the_compiled_train_step_moves_no_rows_audio_nor_its_embeddings(demo_data):
    """Every device keeps its own slice of the text and at most two blocks of its sequence group's windows:
    no collective returns one row's audio or one row's embeddings, let alone the batch's."""
    largest, one_row = _largest_activation_collective(demo_data)
    assert largest < one_row, f"a collective returns {largest} elements (one row: {one_row})"


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["_merge_rows", "global"])
def test_the_per_row_gather_and_the_old_global_merge_move_a_rows_audio_or_embeddings(demo_data, monkeypatch, merge):
    """The guard above fails for the merges it replaced: XLA all-gathers what the gather indexes or returns."""
    function = global_merge if merge == "global" else audio_merge._merge_rows
    largest, one_row = _largest_activation_collective(demo_data, function, monkeypatch)
    assert largest >= one_row
