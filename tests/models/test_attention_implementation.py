"""The `attention_implementation` setting: which attention kernel runs (XLA, cuDNN, blocked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models
from tests.models._configs import forward, model_config


@pytest.mark.parametrize("name", ["causal_lm", "roformer_mlm"])
def test_xla_implementation_equals_the_default(name, rng):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
    outputs = []
    for implementation in (None, "xla"):
        config = model_config(name, num_layers=2, attention_implementation=implementation,
                              attention_scale="entropy_invariant")
        outputs.append(forward(models.build_model(config, rngs=nnx.Rngs(0)), tokens))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    ({"attention_implementation": "flash"},
     r"`attention_implementation`.*one of \[None, 'xla', 'cudnn', 'blocked'\].*'flash'"),
    ({"attention_implementation": "cudnn"},
     r"`attention_implementation`.*'bfloat16' or 'float16'.*float32"),
    ({"attention_implementation": "blocked", "attention_block_q": 0},
     r"`attention_block_q`.*0"),
    ({"attention_implementation": "xla", "attention_block_k": 64},
     r"`attention_block_k`.*None unless.*'blocked' or None.*64"),
])
def test_bad_attention_implementation_names_the_setting(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build_model(model_config("causal_lm", **overrides), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["causal_lm", "roformer_mlm"])
def test_blocked_equals_xla_through_the_model(name, rng):
    """Logits and parameter gradients of a padded batch: blocked (blocks of 4 x 8 over a
    ragged length of 19) against the dense XLA path."""
    tokens = jnp.asarray(rng.integers(0, 64, (3, 19)), jnp.int32)
    valid = jnp.asarray(np.arange(19)[None, :] < rng.integers(1, 20, size=(3, 1)))
    results = []
    for overrides in ({"attention_implementation": "xla"},
                      {"attention_implementation": "blocked", "attention_block_q": 4,
                       "attention_block_k": 8}):
        config = model_config(name, num_layers=2, num_kv_heads=2,
                              attention_scale="entropy_invariant", entropy_base=8.0,
                              **overrides)
        model = models.build_model(config, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            logits = nnx.merge(graphdef, params, rest)(tokens, valid=valid)
            return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) / 1e3, logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((logits, grads))
    (dense_logits, dense_grads), (blocked_logits, blocked_grads) = results
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(blocked_logits)[real], np.asarray(dense_logits)[real],
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(dense_grads),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_on_gpu(rng):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 128)), jnp.int32)
    outputs = []
    for implementation in ("xla", "cudnn"):
        config = model_config("causal_lm", width=128, num_heads=2, dtype="bfloat16",
                              attention_implementation=implementation)
        outputs.append(forward(models.build_model(config, rngs=nnx.Rngs(0)), tokens))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=5e-2, atol=5e-2)


def test_blocked_under_remat_gives_the_same_gradients(rng):
    """`jax.checkpoint` around blocks whose attention is a custom VJP: same gradients."""
    tokens = jnp.asarray(rng.integers(0, 64, (2, 21)), jnp.int32)
    grads = []
    for remat in ("none", "full", "dots"):
        config = model_config("causal_lm", num_layers=2, remat=remat,
                              attention_implementation="blocked", attention_block_q=8,
                              attention_block_k=8, attention_scale="entropy_invariant")
        model = models.build_model(config, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)

        def loss(params, rest, graphdef=graphdef):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
            return models.cross_entropy(logits, tokens[:, 1:])

        grads.append(jax.jit(jax.grad(loss))(params, rest))
    for other in grads[1:]:
        for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(grads[0]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
