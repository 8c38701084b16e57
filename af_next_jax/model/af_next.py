"""The whole AF-Next model: encode audio windows, stamp time (RoTE), project, merge into text, decode.

transformers reference: `MusicFlamingoForConditionalGeneration` (RoTE) and
`AudioFlamingo3ForConditionalGeneration` (`config.rote is None`). Inputs follow `af_next_jax/batch.py`.
Parameters: {"encoder", "projector", "decoder"}; RoTE has none. `numerics` (model/numerics.py) says
which platform-specific backward passes the program runs: plain autodiff unless the program builder
passes `numerics_for_platform(platform)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from af_next_jax.attention.platform import AttentionChoice
from af_next_jax.config import LOAD_BALANCED_STRATEGIES, ModelConfig
from af_next_jax.model import axes
from af_next_jax.model.audio_merge import merge_audio_into_text
from af_next_jax.model.decoder import Decoder
from af_next_jax.model.encoder import AudioEncoder
from af_next_jax.model.numerics import Numerics
from af_next_jax.model.projector import Projector
from af_next_jax.model.rote import apply_rotary_time_embedding

# Parameters that are fixed tables in the checkpoint and must never be updated by an optimizer.
FROZEN_PARAMETERS = (("encoder", "embed_positions"),)


class AFNextModel(nn.Module):
    config: ModelConfig
    numerics: Numerics = Numerics()

    def setup(self):
        config, numerics = self.config, self.numerics
        dtype = jnp.dtype(config.compute_dtype)
        # The encoder's windows are short (1500): it is parallelised over windows, never over sequence,
        # and runs the configured kernel whatever the decoder's sequence-parallel strategy.
        self.encoder = AudioEncoder(config.encoder, dtype, config.remat_policy, config.scan_layers,
                                    config.attention_kernel, numerics=numerics)
        self.projector = Projector(config.projector, config.decoder.hidden_size, dtype, numerics=numerics)
        self.decoder = Decoder(config.decoder, dtype, config.remat_policy, config.scan_layers,
                               AttentionChoice(config.attention_kernel, config.sequence_parallelism),
                               numerics=numerics)

    def encode_audio_windows(self, mel_windows_NxMxT, mel_valid_frames_N, window_index_N):
        """Log-mel windows -> projected audio embeddings [N, T, decoder width] and their valid mask."""
        audio_NxTxA, valid_NxT = self.encoder(mel_windows_NxMxT, mel_valid_frames_N)
        if self.config.rote is not None:
            audio_NxTxA = apply_rotary_time_embedding(audio_NxTxA, window_index_N, self.config.rote,
                                                       self.config.max_windows_per_audio)
        return self.projector(audio_NxTxA), valid_NxT

    def embed_audio_and_text(self, batch):
        text_BxLxD = self.decoder.embed(batch["token_ids"])
        if "mel_windows" not in batch:
            return text_BxLxD
        audio_NxTxD, valid_NxT = self.encode_audio_windows(
            batch["mel_windows"], batch["mel_valid_frames"], batch["window_index"])
        merged_BxLxD = merge_audio_into_text(text_BxLxD, batch["token_ids"], audio_NxTxD, valid_NxT,
                                             self.config.audio_token_id)
        return axes.constrain(merged_BxLxD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

    def __call__(self, batch, *, return_hidden: bool = False):
        """Logits [B, L, vocab] (or final hidden states [B, L, D] with `return_hidden`)."""
        embeds_BxLxD = self.embed_audio_and_text(batch)
        positions_BxL, segment_ids_BxL = batch["positions"], batch["segment_ids"]
        load_balanced = self.config.sequence_parallelism in LOAD_BALANCED_STRATEGIES
        if load_balanced:
            from af_next_jax.parallel.layout import from_load_balanced, to_load_balanced
            embeds_BxLxD, positions_BxL, segment_ids_BxL = (
                to_load_balanced(x, axis=1) for x in (embeds_BxLxD, positions_BxL, segment_ids_BxL))
        hidden_BxLxD = self.decoder(embeds_BxLxD, positions_BxL, segment_ids_BxL)
        if load_balanced:
            hidden_BxLxD = from_load_balanced(hidden_BxLxD, axis=1)
        return hidden_BxLxD if return_hidden else self.decoder.logits(hidden_BxLxD)

    def output_projection(self):
        """The lm_head matrix [hidden, vocab], for losses that compute logits in chunks."""
        return self.decoder.output_projection()

