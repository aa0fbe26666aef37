"""`models.attention_entropies`: per-layer attention entropy of a model's own forward pass."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models
from tests.models._configs import model_config
from tests.models.test_ner_variants import dense64, rope64


def build(name, **overrides):
    model = models.build_model(model_config(name, **overrides), rngs=nnx.Rngs(0))
    model.eval()
    return model


def layer_norm64(x, norm, epsilon):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + epsilon) * np.asarray(norm.scale[...], np.float64)
            + np.asarray(norm.bias[...], np.float64))


@pytest.mark.parametrize("scale", ["standard", "entropy_invariant"])
def test_first_layer_matches_a_float64_oracle(rng, scale):
    """Post-norm RoFormer: `x = LN(E[t])`, `q = x W_q + b`, `k = x W_k + b`, RoPE on both,
    logits `κ_i q_i·k_j` over the real keys (`κ_i = 1/√d` or `log_512(n_i)/√d`), then
    `H_i = −Σ p log p`; padded queries see nothing and get 0."""
    model = build("roformer", attention_scale=scale, entropy_base=8.0)
    c = model.config
    b, n = 2, 9
    tokens = rng.integers(0, 64, (b, n))
    valid = np.arange(n)[None, :] < np.array([[n], [6]])
    _, entropies = models.attention_entropies(model, jnp.asarray(tokens, jnp.int32),
                                              valid=jnp.asarray(valid))
    attention = model.transformer.blocks[0].attention
    x = layer_norm64(np.asarray(model.embed.embedding[...], np.float64)[tokens],
                     model.transformer.norm, c.norm_epsilon)
    q, k = dense64(attention.query, x), dense64(attention.key, x)  # [b, n, h, d]
    d = q.shape[-1]
    want = np.zeros((b, n, c.num_heads))
    for e in range(b):
        real = np.flatnonzero(valid[e])
        for head in range(c.num_heads):
            qr = rope64(q[e, :, head], c.rope_layout, c.rope_base)
            kr = rope64(k[e, :, head], c.rope_layout, c.rope_base)
            kappa = (1 if scale == "standard" else math.log(real.size) / math.log(8.0))
            for i in real:
                z = kappa * (kr[real] @ qr[i]) / math.sqrt(d)
                p = np.exp(z - z.max())
                p /= p.sum()
                want[e, i, head] = -np.sum(p * np.log(p))
    assert len(entropies) == c.num_layers
    np.testing.assert_allclose(np.asarray(entropies[0]), want, rtol=1e-4, atol=1e-4)


def test_output_is_the_models_and_the_model_is_left_as_it_was(rng):
    model = build("roformer_mlm", num_layers=3)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    output, entropies = models.attention_entropies(model, tokens)
    np.testing.assert_array_equal(np.asarray(output), np.asarray(model(tokens)))
    assert [e.shape for e in entropies] == [(2, 8, 4)] * 3
    assert all(np.all((np.asarray(e) >= 0) & (np.asarray(e) <= math.log(8) + 1e-5))
               for e in entropies)
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, models.Attention)]
    assert not any(layer.record_entropy for layer in layers)
    assert not nnx.state(model, nnx.Intermediate)  # nothing left behind


def test_same_values_under_nnx_jit(rng):
    model = build("causal_lm", num_layers=2)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 10)), jnp.int32)
    eager = models.attention_entropies(model, tokens)[1]
    jitted = nnx.jit(lambda m, t: models.attention_entropies(m, t)[1])(model, tokens)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Causal: query i sees i + 1 keys, so its entropy is at most log(i + 1).
    bound = np.log(np.arange(1, 11))[None, :, None] + 1e-5
    assert all(np.all(np.asarray(e) <= bound) for e in eager)


def test_a_module_without_attention_is_rejected():
    with pytest.raises(ValueError, match="`model`: expected a module with `Attention` layers"):
        models.attention_entropies(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))
