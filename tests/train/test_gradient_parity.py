"""The training loss and its gradient for every parameter equal transformers' on the same weights and batch.

Logit parity (tests/model/test_parity_transformers.py) checks the forward pass; the training step also
runs hand-written backward passes (attention/recompute.py's recomputing attention, and with the CPU's
numerics model/contract.py's matmuls and layers.swiglu), which only this test compares with the
reference's autograd, for both numerics (model/numerics.py): the CPU's and plain autodiff (TPU, GPU).
float32 on both sides; the torch gradients are mapped into our parameter tree by the converter's own
key rules (`params_from_tensors`).
"""

import jax
import numpy as np
import pytest
import torch

from af_next_jax.config import tiny
from af_next_jax.convert.mapping import canonical_key, params_from_tensors
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.numerics import numerics_for_platform
from af_next_jax.model.synthetic import synthetic_batch, to_transformers_inputs
from af_next_jax.train.train_step import model_loss_sums
from hf_reference import build_audio_model

# Per parameter: max |ours - transformers| <= this x max |transformers' gradient| of that parameter.
RELATIVE_TOLERANCE = 1e-4
FRAMES = tiny().encoder.mel_frames_per_window


@pytest.fixture(scope="module")
def model_and_batch():
    config = tiny()
    hf_model, params = build_audio_model(config, seed=3)
    # 512 tokens: causal attention runs in row blocks (recompute.CAUSAL_ROW_BLOCKS); the first audio's
    # second window is partly padding, so the encoder's masked keys are in the backward pass too.
    batch = synthetic_batch(config, audio_frames_per_example=[[FRAMES + 260], [FRAMES]], seq_len=512,
                            num_windows=4, seed=11)
    return config, hf_model, params, batch


@pytest.fixture(scope="module")
def transformers_gradients(model_and_batch):
    config, hf_model, _, batch = model_and_batch
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in to_transformers_inputs(batch).items()}
    labels = np.full(batch["token_ids"].shape, -100, np.int64)  # transformers shifts labels itself
    labels[:, 1:] = np.where(batch["loss_mask"][:, :-1] > 0, batch["target_ids"][:, :-1], -100)
    hf_model.train()  # dropout rates are 0 in these configs; train mode only enables autograd paths
    hf_loss = hf_model(**inputs, labels=torch.from_numpy(labels)).loss
    hf_loss.backward()
    hf_grads = {canonical_key(name): (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                for name, p in hf_model.named_parameters()}
    for name, buffer in hf_model.state_dict().items():  # fixed tensors (positions) have no gradient
        hf_grads.setdefault(canonical_key(name), np.zeros(buffer.shape, np.float32))
    return float(hf_loss.detach()), params_from_tensors(hf_grads, config)


@pytest.fixture(scope="module", params=["cpu", "tpu"], ids=["cpu_numerics", "plain_numerics"])
def both_gradients(request, model_and_batch, transformers_gradients):
    """(ours, transformers') loss and gradients; ours with the numerics of a program for that platform."""
    config, _, params, batch = model_and_batch
    model = AFNextModel(config, numerics=numerics_for_platform(request.param))

    def loss(params):
        loss_sum, _, tokens = model_loss_sums(model, params, batch, loss_chunk_length=128)
        return loss_sum / tokens

    ours_loss, ours_grads = jax.jit(jax.value_and_grad(loss))(params)
    hf_loss, hf_grads = transformers_gradients
    return float(ours_loss), hf_loss, ours_grads, hf_grads


def test_loss_equals_transformers(both_gradients):
    ours_loss, hf_loss, _, _ = both_gradients
    assert abs(ours_loss - hf_loss) <= 1e-5 * abs(hf_loss), (ours_loss, hf_loss)


def test_every_parameter_gradient_equals_transformers(both_gradients):
    _, _, ours, reference = both_gradients
    mismatches = []
    for (path, actual), expected in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(reference)):
        scale = np.abs(expected).max()
        diff = np.abs(np.asarray(actual) - expected).max()
        if diff > RELATIVE_TOLERANCE * scale:
            mismatches.append(f"{jax.tree_util.keystr(path)}: max |diff| {diff:.3g} vs scale {scale:.3g}")
    assert not mismatches, "\n".join(mismatches)
