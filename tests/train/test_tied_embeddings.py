"""`tie_word_embeddings=True`: the lm_head is the token embedding's transpose, in the loss and its gradient.

Reference: the untied model whose lm_head is set to the embedding's transpose. Its loss must be the
tied model's, and the tied embedding's gradient the sum of the untied embedding's gradient (input side)
and the untied lm_head's gradient transposed (output side). Text-only rows: the tie is the decoder's
alone, and leaving the encoder out of the graph halves the compile time.
"""

import dataclasses

import jax
import numpy as np

from af_next_jax.batch import TEXT_FIELDS
from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.train.optimizer import parameter_labels
from af_next_jax.experiment import unbox
from af_next_jax.train.train_step import model_loss_sums
from trainer_helpers import micro_batch


def _loss_and_grads(config, params, batch):
    model = AFNextModel(config)

    def loss(p):
        loss_sum, _, tokens = model_loss_sums(model, p, batch, loss_chunk_length=64)
        return loss_sum / tokens

    return jax.jit(jax.value_and_grad(loss))(params)


def test_tied_lm_head_is_the_embedding_in_the_loss_and_its_gradient():
    untied_config = tiny()
    tied_config = tiny(decoder=dataclasses.replace(untied_config.decoder, tie_word_embeddings=True))
    batch = {name: value for name, value in micro_batch(11).items() if name in TEXT_FIELDS}
    tied = unbox(jax.jit(AFNextModel(tied_config).init)(jax.random.PRNGKey(0), batch))
    decoder = tied["params"]["decoder"]
    assert "lm_head" not in decoder  # one matrix, not two
    assert set(jax.tree.leaves(parameter_labels(tied, "full")["params"]["decoder"])) == {"decoder"}

    untied = jax.tree.map(lambda x: x, tied)
    untied["params"]["decoder"]["lm_head"] = decoder["embed_tokens"].T
    tied_loss, tied_grads = _loss_and_grads(tied_config, tied, batch)
    untied_loss, untied_grads = _loss_and_grads(untied_config, untied, batch)
    np.testing.assert_allclose(float(tied_loss), float(untied_loss), rtol=1e-6)

    untied_decoder = untied_grads["params"]["decoder"]
    output_side = np.asarray(untied_decoder["lm_head"]).T
    input_side = np.asarray(untied_decoder["embed_tokens"])
    assert np.abs(output_side).max() > 0 and np.abs(input_side).max() > 0  # both uses contribute
    np.testing.assert_allclose(tied_grads["params"]["decoder"]["embed_tokens"], input_side + output_side,
                               rtol=1e-5, atol=1e-7)
