"""Sampling: reproducible from its key; top-k and top-p keep exactly the tokens they should; stop
tokens and max_new_tokens end a row. References: transformers' TopKLogitsWarper / TopPLogitsWarper
semantics (keep the k largest; keep the smallest most-likely set whose mass reaches p)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.inference.decoding import Generator
from af_next_jax.inference.sampling import SamplingConfig, filter_logits, next_token
from af_next_jax.model.af_next import AFNextModel
from decoding_helpers import left_padded_prompts

PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # ranks: token 1, 3, 2, 0


def kept(sampling, probs=PROBS):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    return set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, sampling))[0])).tolist())


@pytest.mark.parametrize("top_k,expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 2}), (0, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(SamplingConfig(temperature=1.0, top_k=top_k)) == expected


@pytest.mark.parametrize("top_p,expected", [(0.4, {1}), (0.5, {1}), (0.51, {1, 3}), (0.8, {1, 3}),
                                            (0.81, {1, 3, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingConfig(temperature=1.0, top_p=top_p)) == expected


def test_top_k_then_top_p_compose():
    assert kept(SamplingConfig(temperature=1.0, top_k=3, top_p=0.99)) == {1, 3, 2}


def test_samples_stay_inside_the_filter_and_follow_the_probabilities():
    logits = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(0), 4000)

    def draws(sampling):
        return np.asarray(jax.vmap(lambda k: next_token(logits, k, sampling))(keys))[:, 0]

    assert set(draws(SamplingConfig(temperature=1.0, top_k=2)).tolist()) == {1, 3}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.8)).tolist()) == {1, 3}
    frequencies = np.bincount(draws(SamplingConfig(temperature=1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(frequencies, PROBS, atol=0.03)


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    np.testing.assert_array_equal(next_token(logits, None, SamplingConfig()), [1, 0])


def test_invalid_settings_are_refused():
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


@pytest.fixture(scope="module")
def text_model():
    config = tiny()
    prompts = left_padded_prompts(config, [[], []], seq_len=64, seed=2, text_tokens_between=5, extra_text=(0, 4))
    params = AFNextModel(config).init(jax.random.key(1), prompts)
    return Generator(config), params, prompts


def test_sampling_is_reproducible_from_its_key(text_model):
    generator, params, prompts = text_model
    sampling = SamplingConfig(temperature=1.0)
    run = lambda seed: generator.generate(params, prompts, max_new_tokens=12, sampling=sampling,
                                          key=jax.random.key(seed)).tokens_BxN
    np.testing.assert_array_equal(run(3), run(3))
    assert (run(3) != run(4)).any()


def test_sampling_needs_an_explicit_key(text_model):
    generator, params, prompts = text_model
    with pytest.raises(ValueError, match="explicit key"):
        generator.generate(params, prompts, max_new_tokens=4, sampling=SamplingConfig(temperature=1.0))


def test_a_row_stops_at_its_stop_token_and_is_padded_after(text_model):
    generator, params, prompts = text_model
    free = generator.generate(params, prompts, max_new_tokens=10)
    assert (free.lengths_B == 10).all() and not free.stopped_B.any()
    stop = int(free.tokens_BxN[0, 3])  # row 0 meets it at step 3 (or earlier, if it repeats)
    first = int(np.flatnonzero(free.tokens_BxN[0] == stop)[0])
    stopped = generator.generate(params, prompts, max_new_tokens=10, stop_token_ids=(stop,), pad_id=0)
    assert stopped.stopped_B[0] and stopped.lengths_B[0] == first + 1
    assert stopped.row(0) == free.tokens_BxN[0, :first + 1].tolist()
    assert (stopped.tokens_BxN[0, first + 1:] == 0).all()
    if stop not in free.tokens_BxN[1]:
        assert not stopped.stopped_B[1] and stopped.row(1) == free.tokens_BxN[1].tolist()
