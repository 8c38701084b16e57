"""The memory planner: an experiment's per-device peak, predicted from its config without compiling.

`plan(config, num_devices)` returns the terms below in bytes (one device, one train step). Inputs:
the experiment's own model config (dimensions, remat policy, compute dtype), its mesh (axis sizes,
parameter and window sharding), its data shapes (rows, sequence length, windows per micro-batch,
loss chunk) and its stage (which groups train). The parameters, optimizer state, gradients and
batch are exact: their shard shapes come from the same rules table and `jax.eval_shape` the trainer
uses (nothing is allocated). The activation terms are counted from the layers' code (decoder.py,
encoder.py, af_next.py, loss.py) at the per-device shapes, and checked against what libtpu keeps
live (`python benchmarks/scaling.py --recompile` writes the compiled figures; docs/SCALING.md shows
both). bf16 below means the compute dtype; f32 the parameter dtype.

Persistent (live for the whole step; the new state aliases the donated old one):
  parameters          f32 shards of every parameter (fsdp x, with `shard_params_over_sequence`,
                      ring x ulysses over the embedding dimension; tensor over heads / MLP / vocab)
  optimizer state     AdamW m and v (f32) of the trained groups only; frozen groups hold none
  batch               the step's [A, B, L] token fields and [A, N, 128, 3000] mel windows, sharded

Three moments of the step, each a set of buffers live together (b = B / (data x fsdp) rows,
t = b x L / (ring x ulysses) tokens, w = N / window shards windows of P = 1500 positions per device;
bf16 = the compute dtype). The peak is persistent + the largest moment.

1. Forward, at the audio merge (`merge_audio_into_text`, af_next.py):
  embedding table     the token-embedding lookup reads the [V, D] table replicated over fsdp (its
                      rule is (vocab, None)): a whole bf16 copy, V / tensor x D
  audio merge         model/audio_merge.py: each device keeps its text slice and its own block of
                      windows (w x 750 x D, the projector output below); with the windows over the
                      sequence axes the blocks travel around the sequence group, one more block in
                      flight, and with slot blocks and several rows a device one more, the block
                      swapped in; the audio picked for this device's t text positions (t x D)
  encoder residuals   what the remat policy saves of each encoder layer for this device's windows
                      ("full", and "save_attention_out", whose name only the decoder sets: the layer
                      input, w x P x 1280), only when the encoder trains (a frozen
                      encoder is never differentiated)
  encoder front       the convolutions' GELU inputs and outputs (3 at 2P, 2 at P positions per
                      window) when the encoder trains; the projector's hidden state and its GELU
                      (2 x w x 750 x D, what its backward reads) and its output (w x 750 x D) when
                      the projector trains
  text embeddings     this device's [b, L / seq shards, D] lookup
2. Backward, at the decoder's last layer (the loss just differentiated):
  gradients           f32, the shard of every trained parameter (exact, from the shardings); twice
                      with gradient accumulation (the running sum and this micro-batch's)
  decoder residuals   what the remat policy saves of each decoder layer, for all layers at once (the
                      scan stacks them): "full" keeps the layer input (t x D); the dots policies keep
                      every projection output (q, k, v, o, gate, up, down: t x (3D + 2 G d + 2F));
                      "none" keeps everything the backward reads (`_decoder_saved_per_token`)
  encoder residuals   as above
  encoder front       as above, without the projector's output: kept until the encoder's and the
                      projector's backward, which run after the decoder's
  layer weights       when the decoder trains: one layer's weights gathered in bf16 (x2: the next
                      layer's prefetched) and its weight gradient whole in f32 before the reduce-scatter
  layer or loss       the larger of one layer's backward working set (its intermediates and the
                      MLP cotangents, `_layer_backward_per_token`) and one loss chunk: [b, C / seq
                      shards, V / tensor] float32 logits and their bf16 cotangent
  lm_head             the loss's one bf16 copy of the gathered lm_head (train/loss.py), which libtpu
                      keeps from the loss through the decoder's backward
3. Backward, at the audio merge (when the projector trains): the merge's transpose accumulates each
   window block's cotangent on its way around the ring (two blocks, three swapped, the t x D cotangent at this
   device's slots); the gradients, encoder residuals and front are live, and when the decoder trains,
   so is the token embedding's gradient: a whole f32 [V, D] table the text cotangents are
   scatter-added into (its all-reduce and slice to the shard come after the merge's buffers are freed).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from af_next_jax.compile.report import bytes_per_device
from af_next_jax.experiment import build_program, experiment_from
from af_next_jax.train.loss import largest_divisor_at_most

F32 = 4  # the parameter dtype; activations use the compute dtype's width (`act`)


@dataclasses.dataclass
class Plan:
    persistent: dict[str, int]              # live for the whole step
    phases: dict[str, dict[str, int]]       # {moment of the step: terms live together then}

    def phase_bytes(self, phase: str) -> int:
        return sum(self.persistent.values()) + sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak(self) -> int:
        return self.phase_bytes(self.peak_phase)


def _decoder_saved_per_token(decoder, policy: str, tensor: int, act: int) -> int:
    """Bytes one token keeps per decoder layer between the forward and the backward pass."""
    width, kv_width, mlp = decoder.hidden_size, decoder.num_kv_heads * decoder.head_dim, decoder.intermediate_size
    layer_input = width * act
    if policy == "full":
        return layer_input
    projections = (width + 2 * kv_width) // tensor + width + 2 * mlp // tensor   # q k v | o | gate up
    down = width
    if policy in ("dots", "dots_with_no_batch_dims"):
        return (projections + down) * act
    if policy == "save_attention_out":
        return layer_input + width // tensor * act
    # "none": every forward intermediate the backward reads (both norms' outputs, rotated q / k, attention
    # output, the SwiGLU activation) besides the projections.
    return layer_input + (projections + down + 2 * width + (width + kv_width) // tensor + mlp // tensor) * act


def _encoder_saved_per_position(encoder, policy: str, tensor: int, act: int) -> int:
    """Bytes one window position keeps per encoder layer between the forward and the backward pass."""
    width, mlp = encoder.hidden_size, encoder.intermediate_size
    layer_input = width * act
    if policy in ("full", "save_attention_out"):  # the encoder names no "attention_out": only its input is kept
        return layer_input
    projections = 4 * width // tensor + width + mlp // tensor + width   # q k v o | fc1 | fc2 (out + in)
    if policy in ("dots", "dots_with_no_batch_dims"):
        return projections * act
    return layer_input + (projections + 2 * width + mlp // tensor) * act


def _layer_backward_per_token(decoder, tensor: int, act: int) -> int:
    """One decoder layer's backward: its forward intermediates (x, norm, q, attention out, residual,
    norm at D; k, v; gate, up, SwiGLU at F) and the cotangents of gate and up, bf16."""
    width, kv_width, mlp = decoder.hidden_size, decoder.num_kv_heads * decoder.head_dim, decoder.intermediate_size
    return (6 * width + 2 * kv_width // tensor + 5 * mlp // tensor) * act


def abstract_inputs(config, num_devices: int):
    """(the Program's experiment, its mesh sizes, {"parameters", "optimizer state", "gradients", "batch"}
    bytes per device, its slot blocks): from the shardings `build_program` gives the trainer, on an
    abstract mesh."""
    program = build_program(experiment_from(config), num_devices)
    state = program.abstract_state()
    trained = jax.tree.map(lambda label, leaf: leaf if label != "frozen" else None, program.labels, state.params)
    return program.experiment, program.mesh_sizes, {
        "parameters": bytes_per_device(state.params), "optimizer state": bytes_per_device(state.opt_state),
        "gradients": bytes_per_device([leaf for leaf in jax.tree.leaves(trained)]),
        "batch": bytes_per_device(program.step_batch)}, program.slot_blocks


def plan(config, num_devices: int) -> Plan:
    experiment, sizes, persistent, slot_blocks = abstract_inputs(config, num_devices)
    model_config, trainer = experiment.model, experiment.trainer
    # Allocated as the backward pass produces them; with accumulation, the running sum and this micro-batch's.
    gradients = persistent.pop("gradients") * (2 if trainer.grad_accum_steps > 1 else 1)
    decoder, encoder = model_config.decoder, model_config.encoder
    data, tensor = experiment.data, sizes["tensor"]
    trained = trainer.trained_groups
    policy = model_config.remat_policy
    act = np.dtype(model_config.compute_dtype).itemsize
    sequence_shards = sizes["ring"] * sizes["ulysses"]
    window_shards = sizes["data"] * sizes["fsdp"] * (sequence_shards if experiment.mesh.shard_windows_over_sequence
                                                     else 1)
    rows = data.batch_size // (sizes["data"] * sizes["fsdp"])
    tokens = rows * data.seq_len // sequence_shards
    windows = math.ceil(data.max_windows_per_batch / window_shards)
    positions = encoder.max_source_positions
    encoder_per_window = positions * _encoder_saved_per_position(encoder, policy, tensor, act)
    encoder_saved = encoder.num_layers * windows * encoder_per_window if "encoder" in trained else 0

    # The merge (model/audio_merge.py) keeps this device's text slice and its windows' block; with the
    # windows over the sequence axes a second block is in flight around the sequence group's ring, and
    # with slot blocks (several rows a device) a third: the block the devices swapped into.
    block = windows * encoder.tokens_per_window * decoder.hidden_size * act
    ring_blocks = block if experiment.mesh.shard_windows_over_sequence and sequence_shards > 1 else 0
    transposed = block if slot_blocks > 1 and rows > 1 else 0
    at_slots = tokens * decoder.hidden_size * act  # the audio picked for this device's text positions
    embed_table = decoder.vocab_size // tensor * decoder.hidden_size * act
    frontend = windows * (3 * 2 * positions + 2 * positions) * encoder.hidden_size * act if "encoder" in trained else 0
    # The projector's hidden state and GELU output (what its backward reads) and its output (the merge's input).
    projector_tokens = windows * encoder.tokens_per_window
    projector_saved = 2 * projector_tokens * decoder.hidden_size * act if "projector" in trained else 0
    projector_output = projector_saved // 2
    forward = {"embedding table, gathered": embed_table,
               "audio merge: a window block in flight (and swapped), audio at the text's slots":
                   ring_blocks + transposed + at_slots,
               "encoder residuals": encoder_saved,
               "encoder convolutions and projector, kept for their backward, and its output":
                   frontend + projector_saved + projector_output,
               "text embeddings": tokens * decoder.hidden_size * act}

    chunk = largest_divisor_at_most(data.seq_len, trainer.loss_chunk_length)
    logits = rows * max(1, chunk // sequence_shards) * decoder.vocab_size // tensor * F32
    # The chunk's float32 logits and their bf16 cotangent.
    loss_chunk = logits + logits // 2
    layer = tokens * _layer_backward_per_token(decoder, tensor, act)
    # A trained decoder layer's backward under FSDP: its weights gathered in bf16 (and the next layer's,
    # prefetched) and its weight gradient whole in f32 until the reduce-scatter.
    heads_width, kv_width = decoder.num_heads * decoder.head_dim, decoder.num_kv_heads * decoder.head_dim
    layer_parameters = (2 * decoder.hidden_size * heads_width + 2 * decoder.hidden_size * kv_width
                        + 3 * decoder.hidden_size * decoder.intermediate_size) // tensor
    layer_weights = layer_parameters * (2 * act + F32) if "decoder" in trained else 0
    # The merge's transpose (the projector trains): the cotangent of each window block is accumulated on
    # its way around the ring (two blocks live), after the decoder's backward, while the encoder still
    # waits for its cotangent.
    projector_trains = "projector" in trained
    merge_backward = {"gradients": gradients,
                      "audio merge: block cotangents (x2, x3 swapped), cotangent at the text's slots":
                          2 * block + transposed + at_slots,
                      "encoder residuals": encoder_saved,
                      "encoder convolutions and projector, kept for their backward": frontend + projector_saved,
                      "text embeddings cotangent": tokens * decoder.hidden_size * act,
                      # The embedding's gradient, when the decoder trains: the text cotangents scatter-added
                      # into a whole f32 [V, D] table (the lookup read a table replicated over fsdp); it is
                      # all-reduced and sliced to the shard after the merge's buffers are freed.
                      "embedding gradient, whole f32 table": embed_table // act * F32 if "decoder" in trained else 0}
    merge_backward = {term: value if projector_trains else 0 for term, value in merge_backward.items()}
    backward = {"gradients": gradients,
                "decoder residuals": decoder.num_layers * tokens * _decoder_saved_per_token(decoder, policy, tensor,
                                                                                            act),
                "encoder residuals": encoder_saved,
                # Kept from the forward until the encoder's and the projector's backward, after the decoder's.
                "encoder convolutions and projector, kept for their backward": frontend + projector_saved,
                "max(one layer's backward, loss chunk)": max(layer, loss_chunk),
                # train/loss.py gathers the lm_head once, in bf16, for all chunks; libtpu keeps that copy
                # from the loss through the decoder's backward (seen in its buffer assignment).
                "lm_head gathered in bf16": embed_table,
                "one decoder layer's weights gathered (x2) and its f32 weight gradient": layer_weights}
    return Plan(persistent, {"forward: the audio merge": forward, "backward: the decoder's last layer": backward,
                             "backward: the audio merge": merge_backward})
