"""The `attention_implementation` setting: which `jax.nn.dot_product_attention` kernel runs."""

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


@pytest.mark.parametrize("value, match", [
    ("flash", r"`attention_implementation`.*one of \[None, 'xla', 'cudnn'\].*'flash'"),
    ("cudnn", r"`attention_implementation`.*'bfloat16' or 'float16'.*float32"),
])
def test_bad_attention_implementation_names_the_setting(value, match):
    with pytest.raises(ValueError, match=match):
        models.build_model(model_config("causal_lm", attention_implementation=value),
                           rngs=nnx.Rngs(0))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_on_gpu(rng):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 128)), jnp.int32)
    outputs = []
    for implementation in ("xla", "cudnn"):
        config = model_config("causal_lm", width=128, num_heads=2, dtype="bfloat16",
                              attention_implementation=implementation)
        outputs.append(forward(models.build_model(config, rngs=nnx.Rngs(0)), tokens))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=5e-2, atol=5e-2)
