"""BERT-style encoder options: learned positions, token types, RoPE off, exact GELU."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kexue import models
from kexue.models.layers import ACTIVATION_FUNCTIONS
from kexue.parallel import make_mesh, nnx_state_shardings
from tests.models._configs import model_config


def build(name="roformer", **overrides):
    return models.build_model(model_config(name, **overrides), rngs=nnx.Rngs(0))


def table(variable) -> np.ndarray:
    return np.asarray(variable.get_value(), np.float64)


def test_embed_inputs_sum_token_position_and_type_tables(rng):
    model = build(max_positions=12, type_vocab_size=3)
    b, n = 2, 9
    tokens = rng.integers(0, 64, (b, n))
    types = rng.integers(0, 3, (b, n))
    words = table(model.embed.embedding)
    positions = table(model.position_embed.embedding)
    segments = table(model.type_embed.embedding)
    expected = words[tokens] + positions[np.arange(n)][None] + segments[types]
    got = np.asarray(model.embed_inputs(jnp.asarray(tokens), token_types=jnp.asarray(types)))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    shifted = rng.integers(0, 12, (b, n))  # explicit positions index the table
    got = np.asarray(model.embed_inputs(jnp.asarray(tokens), positions=jnp.asarray(shifted)))
    np.testing.assert_allclose(got, words[tokens] + positions[shifted] + segments[0], atol=1e-6)


def test_without_positions_the_encoder_is_permutation_equivariant(rng):
    tokens = rng.integers(0, 64, (1, 7))
    perm = rng.permutation(7)
    no_positions = build(rotary_dim=0, type_vocab_size=2)
    h = np.asarray(no_positions(jnp.asarray(tokens)))
    h_perm = np.asarray(no_positions(jnp.asarray(tokens[:, perm])))
    np.testing.assert_allclose(h_perm, h[:, perm], atol=1e-5)
    with_rope = build()  # same weights (seed 0), RoPE on: order matters
    h = np.asarray(with_rope(jnp.asarray(tokens)))
    h_perm = np.asarray(with_rope(jnp.asarray(tokens[:, perm])))
    assert np.max(np.abs(h_perm - h[:, perm])) > 1e-3


def test_gelu_erf_is_the_exact_gelu(rng):
    x = rng.normal(size=200) * 4
    expected = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    got = np.asarray(ACTIVATION_FUNCTIONS["gelu_erf"](jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-6)


def test_new_tables_have_logical_axes_and_shard():
    model = nnx.eval_shape(lambda: build(max_positions=16, type_vocab_size=2))
    state = nnx.state(model)
    assert state["position_embed"]["embedding"].get_metadata()["out_sharding"] == (
        "positions", "embed")
    assert state["type_embed"]["embedding"].get_metadata()["out_sharding"] == (
        "token_types", "embed")
    shardings = nnx_state_shardings(state, make_mesh(2, 2, 2))
    assert shardings["position_embed"]["embedding"].get_value().spec == P(None, "fsdp")
    assert shardings["type_embed"]["embedding"].get_value().spec == P(None, "fsdp")


def test_flops_count_position_and_type_tables_as_lookups():
    plain = models.flops_per_token(model_config("roformer_mlm"), seq_len=8)
    bert = models.flops_per_token(model_config("roformer_mlm", max_positions=16,
                                               type_vocab_size=2), seq_len=8)
    assert bert == plain


@pytest.mark.parametrize(
    ("overrides", "call", "message"),
    [
        ({"max_positions": 4}, {}, "at most `max_positions` = 4"),
        ({"max_positions": 8}, {"positions": np.arange(6) + 0.5}, "expected int positions"),
        ({}, {"token_types": np.zeros((1, 6), np.int32)}, "no token-type table"),
    ],
)
def test_bad_inputs_for_the_tables(overrides, call, message):
    model = build(**overrides)
    with pytest.raises(ValueError, match=message):
        model(jnp.zeros((1, 6), jnp.int32), **call)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("causal_lm", {"max_positions": 8}, "`max_positions`: expected 0 for model"),
        ("vit", {"type_vocab_size": 2}, "`type_vocab_size`: expected 0 for model"),
        ("roformer", {"max_positions": -1}, "`max_positions`: expected an int >= 0"),
        ("roformer", {"activation": "gelu_tanh"}, "'gelu_erf'"),
    ],
)
def test_bad_config_values(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(name, **overrides)
