"""Chunked cross-entropy: equal to the materialised-logits reference, and never builds full logits."""

import jax
import jax.numpy as jnp
import numpy as np

from af_next_jax.train.loss import chunked_cross_entropy, reference_cross_entropy

B, L, D, V = 2, 64, 16, 50


def _inputs():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(keys[0], (B, L, D))
    lm_head = jax.random.normal(keys[1], (D, V)) * 0.3
    targets = jax.random.randint(keys[2], (B, L), 0, V)
    mask = (jax.random.uniform(keys[3], (B, L)) < 0.6).astype(jnp.float32)
    return hidden, lm_head, targets, mask


def test_chunked_cross_entropy_equals_materialised_logits_in_value_and_gradient():
    hidden, lm_head, targets, mask = _inputs()
    for chunk_length in (L, 16, 5):  # 1 chunk, 4 chunks, and a non-divisor (rounded down to 4 -> 16 chunks)
        chunked = chunked_cross_entropy(hidden, lm_head, targets, mask, chunk_length=chunk_length)
        expected = reference_cross_entropy(jnp.einsum("bld,dv->blv", hidden, lm_head), targets, mask)
        np.testing.assert_allclose(np.array(chunked), np.array(expected), rtol=1e-5)
        grads = jax.grad(lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk_length=chunk_length)[0],
                         argnums=(0, 1))(hidden, lm_head)
        expected_grads = jax.grad(lambda h, w: reference_cross_entropy(jnp.einsum("bld,dv->blv", h, w), targets,
                                                                       mask)[0], argnums=(0, 1))(hidden, lm_head)
        for actual, reference in zip(grads, expected_grads):
            np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-6)


def _shapes_in(jaxpr) -> set:
    shapes = set()
    for equation in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in equation.outvars if hasattr(v.aval, "shape"))
        for value in equation.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    shapes |= _shapes_in(sub)
    return shapes


def test_forward_and_backward_hold_one_chunk_of_logits_at_a_time():
    hidden, lm_head, targets, mask = _inputs()
    loss = lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk_length=16)[0]  # noqa: E731
    shapes = _shapes_in(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, lm_head).jaxpr)
    assert (B, 16, V) in shapes
    assert not any(len(s) >= 2 and s[-1] == V and np.prod(s) >= B * L * V for s in shapes), sorted(shapes)


def test_first_argmax_equals_jnp_argmax_including_ties():
    """The loss's accuracy counts greedy decoding's pick: on ties the first id, as jnp.argmax returns."""
    from af_next_jax.train.loss import first_argmax

    # Logits from 4 levels over 50 ids: every row has its maximum several times.
    logits = jnp.asarray(np.random.default_rng(0).integers(0, 4, (3, 7, V)).astype(np.float32))
    expected = np.asarray(jnp.argmax(logits, axis=-1))
    assert (np.asarray(logits == logits.max(-1, keepdims=True)).sum(-1) > 1).all()  # ties in every row
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(logits)), expected)
