"""The AF-Next model in Flax linen: encoder, RoTE, projector, decoder and the audio/text merge."""
