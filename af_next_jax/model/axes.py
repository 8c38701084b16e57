"""Logical axis names carried by every parameter and activation (MaxText style).

The model only names axes; `af_next_jax.parallel` maps names to mesh axes with one rules table.
"""

import flax.linen as nn

# Parameters.
LAYERS = "layers"            # stacked layer axis created by nn.scan
VOCAB = "vocab"
EMBED = "embed"              # decoder hidden size
MLP = "mlp"                  # decoder SwiGLU width
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
AUDIO_EMBED = "audio_embed"  # encoder hidden size
AUDIO_MLP = "audio_mlp"      # encoder FFN width
AUDIO_HEADS = "audio_heads"
MEL = "mel"                  # mel bins (conv1 input channels)
CONV_WIDTH = "conv_width"    # convolution kernel taps
AUDIO_POSITIONS = "audio_positions"

# Activations.
BATCH = "activation_batch"
LENGTH = "activation_length"          # decoder sequence: the axis sequence parallelism shards
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
WINDOWS = "activation_windows"        # audio windows: the encoder's batch axis
WINDOW_LENGTH = "activation_window_length"
ACT_AUDIO_EMBED = "activation_audio_embed"

ALL_LOGICAL_AXES = (LAYERS, VOCAB, EMBED, MLP, Q_HEADS, KV_HEADS, HEAD_DIM, AUDIO_EMBED, AUDIO_MLP,
                    AUDIO_HEADS, MEL, CONV_WIDTH, AUDIO_POSITIONS, BATCH, LENGTH, ACT_EMBED, ACT_HEADS,
                    ACT_KV_HEADS, ACT_MLP, ACT_VOCAB, WINDOWS, WINDOW_LENGTH, ACT_AUDIO_EMBED)


def constrain(x, axes):
    """Annotate an activation with logical axes; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, axes)
