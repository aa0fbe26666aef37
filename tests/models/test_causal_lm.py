"""Cached decoding equals the full forward pass; generation is greedy / top-k as asked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models
from tests.models._configs import model_config


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_scale": "entropy_invariant", "num_kv_heads": 2, "entropy_base": 8.0},
        {"rope_layout": "half", "rotary_dim": 4, "num_kv_heads": 1, "activation": "swiglu",
         "norm": "rmsnorm", "norm_position": "post", "tie_embeddings": True},
        {"attention_implementation": "blocked", "attention_block_q": 2,
         "attention_block_k": 4, "attention_scale": "entropy_invariant", "num_kv_heads": 2,
         "entropy_base": 8.0},
    ],
)
def test_cached_decoding_equals_full_forward(rng, overrides):
    config = model_config("causal_lm", num_layers=2, **overrides)
    model = models.build_model(config, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 11)))
    full = nnx.jit(lambda m, t: m(t))(model, tokens)

    decode = nnx.jit(lambda m, t, c: m.decode(t, c))
    cache = model.init_cache(2, 16)  # longer than needed: unused slots must not count
    pieces = []
    for start, stop in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11)):  # prefill, then chunks
        logits, cache = decode(model, tokens[:, start:stop], cache)
        pieces.append(logits)
    assert int(cache.index) == 11
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full),
                               rtol=1e-5, atol=1e-5)


def test_greedy_generation_follows_the_full_forward_argmax(rng):
    model = models.build_model(model_config("causal_lm", num_kv_heads=2), rngs=nnx.Rngs(2))
    prompt = jnp.asarray(rng.integers(0, 64, (2, 4)))
    generated = model.generate(prompt, max_new_tokens=5)
    assert generated.shape == (2, 9)
    np.testing.assert_array_equal(np.asarray(generated[:, :4]), np.asarray(prompt))
    logits = nnx.jit(lambda m, t: m(t))(model, generated)
    # Each generated token is the argmax of the full-forward logits at the step before.
    np.testing.assert_array_equal(np.asarray(generated[:, 4:]),
                                  np.asarray(jnp.argmax(logits[:, 3:8], axis=-1)))


def test_top_k_sampling_draws_from_the_top_k_and_is_reproducible(rng):
    model = models.build_model(model_config("causal_lm"), rngs=nnx.Rngs(3))
    prompt = jnp.asarray(rng.integers(0, 64, (3, 3)))
    key = jax.random.key(int(rng.integers(2**31)))
    first = model.generate(prompt, max_new_tokens=4, rng=key, temperature=2.0, top_k=3)
    again = model.generate(prompt, max_new_tokens=4, rng=key, temperature=2.0, top_k=3)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, first))
    top3 = np.argsort(logits[:, 2:6], axis=-1)[..., -3:]
    assert all(np.asarray(first)[b, 3 + s] in top3[b, s] for b in range(3) for s in range(4))


def test_sample_logits_statistics(rng):
    """Temperature-scaled categorical over the top k only, frequencies as the softmax says."""
    logits = jnp.asarray(np.log(np.array([[0.1, 0.2, 0.3, 0.4]])), jnp.float32)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 4000)
    draws = jax.vmap(lambda k: models.sample_logits(logits, k, temperature=1.0, top_k=2))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.0, 0.0, 3 / 7, 4 / 7], atol=0.03)
    greedy = models.sample_logits(logits, keys[0])
    assert int(greedy[0]) == 3


def test_generate_argument_errors():
    model = models.build_model(model_config("causal_lm"), rngs=nnx.Rngs(0))
    prompt = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="`rng`"):
        model.generate(prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="`top_k` must be in"):
        model.generate(prompt, max_new_tokens=2, rng=jax.random.key(0), temperature=1.0,
                       top_k=0)
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        model.generate(prompt, max_new_tokens=0)


def nucleus_reference(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """float64 NumPy: the top-p distribution over one row of logits (arXiv 1904.09751)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    kept = np.zeros_like(p, dtype=bool)
    kept[order[before < top_p]] = True
    out = np.where(kept, p, 0.0)
    return out / out.sum()


def test_top_p_sampling_draws_from_the_nucleus_with_its_probabilities(rng):
    logits = rng.normal(size=(1, 8)) * 1.5
    top_p = float(rng.uniform(0.3, 0.9))
    temperature = float(rng.uniform(0.7, 1.5))
    expected = nucleus_reference(logits[0], temperature, top_p)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 6000)
    draws = jax.vmap(lambda k: models.sample_logits(
        jnp.asarray(logits, jnp.float32), k, temperature=temperature, top_p=top_p))(keys)
    draws = np.asarray(draws).ravel()
    assert set(draws.tolist()) <= set(np.flatnonzero(expected).tolist())
    np.testing.assert_allclose(np.bincount(draws, minlength=8) / draws.size, expected,
                               atol=0.03)


def test_top_p_one_keeps_every_token_and_a_tiny_top_p_is_greedy(rng):
    logits = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    key = jax.random.key(int(rng.integers(2**31)))
    np.testing.assert_array_equal(
        np.asarray(models.sample_logits(logits, key, temperature=1.0, top_p=1.0)),
        np.asarray(models.sample_logits(logits, key, temperature=1.0)))
    np.testing.assert_array_equal(
        np.asarray(models.sample_logits(logits, key, temperature=1.0, top_p=1e-6)),
        np.argmax(np.asarray(logits), axis=-1))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "top_k": 20, "top_p": 0.9}])
def test_stream_yields_the_tokens_of_generate(rng, sampling):
    model = models.build_model(model_config("causal_lm", num_kv_heads=2), rngs=nnx.Rngs(4))
    prompt = jnp.asarray(rng.integers(0, 64, (2, 3)))
    key = jax.random.key(int(rng.integers(2**31))) if sampling else None
    generated = model.generate(prompt, max_new_tokens=6, rng=key, **sampling)
    streamed = list(model.stream(prompt, max_new_tokens=6, rng=key, **sampling))
    assert len(streamed) == 6 and streamed[0].shape == (2,)
    np.testing.assert_array_equal(np.stack([np.asarray(t) for t in streamed], axis=1),
                                  np.asarray(generated[:, 3:]))


def test_sampling_argument_errors_are_raised_before_the_first_token():
    model = models.build_model(model_config("causal_lm"), rngs=nnx.Rngs(0))
    prompt = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"`top_p` must be in \(0, 1\]; got 1.5"):
        model.stream(prompt, max_new_tokens=2, rng=jax.random.key(0), temperature=1.0,
                     top_p=1.5)
    with pytest.raises(ValueError, match="`temperature` must be a finite number >= 0"):
        model.generate(prompt, max_new_tokens=2, temperature=-1.0)
