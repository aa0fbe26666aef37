"""Attention masks against explicit NumPy loops; combination, jit/vmap, and argument errors."""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kexue.ops.masks import causal_mask, combine_masks, padding_mask, prefix_lm_mask
from tests.ops._variants import OpsTestCase


def variant_ops(variant) -> SimpleNamespace:
    """The masks through a chex variant (`self.variant`: under `jax.jit`, or eagerly)."""
    return SimpleNamespace(
        padding_mask=variant(padding_mask),
        causal_mask=variant(causal_mask, static_argnums=(0, 1), static_argnames="offset"),
        combine_masks=variant(combine_masks),
        prefix_lm_mask=variant(prefix_lm_mask, static_argnums=1),
    )


def padding_reference(valid, kv_valid):
    valid, kv_valid = np.asarray(valid) != 0, np.asarray(kv_valid) != 0
    lead = np.broadcast_shapes(valid.shape[:-1], kv_valid.shape[:-1])
    valid = np.broadcast_to(valid, (*lead, valid.shape[-1]))
    kv_valid = np.broadcast_to(kv_valid, (*lead, kv_valid.shape[-1]))
    out = np.zeros((*lead, valid.shape[-1], kv_valid.shape[-1]), bool)
    for idx in np.ndindex(*lead):
        for i in range(valid.shape[-1]):
            for j in range(kv_valid.shape[-1]):
                out[(*idx, i, j)] = valid[(*idx, i)] and kv_valid[(*idx, j)]
    return out


def causal_reference(q_len, k_len, offset):
    out = np.zeros((q_len, k_len), bool)
    for i in range(q_len):
        for j in range(k_len):
            out[i, j] = j <= i + offset
    return out


def prefix_lm_reference(prefix_lengths, seq_len):
    prefix_lengths = np.asarray(prefix_lengths)
    out = np.zeros((*prefix_lengths.shape, seq_len, seq_len), bool)
    for idx in np.ndindex(*prefix_lengths.shape):
        for i in range(seq_len):
            for j in range(seq_len):
                out[(*idx, i, j)] = j < prefix_lengths[idx] or j <= i
    return out


# -------------------------------------------------------------------------- causal


def test_causal_mask_decoding_last_query_sees_everything():
    # Queries are the last q_len of k_len positions: the last query sees every key and
    # the visible counts go up by one per query.
    mask = np.asarray(causal_mask(3, 10))
    np.testing.assert_array_equal(mask.sum(-1), [8, 9, 10])


# ----------------------------------------------------------------------- prefix LM


def test_prefix_lm_mask_limits():
    n = 6
    np.testing.assert_array_equal(prefix_lm_mask(0, n), causal_reference(n, n, 0))
    np.testing.assert_array_equal(prefix_lm_mask(n, n), np.ones((n, n), bool))
    # The prefix block is bidirectional; a prefix token never sees a target token.
    m = np.asarray(prefix_lm_mask(np.int32(3), n))
    assert m[:3, :3].all() and not m[:3, 3:].any()


# ------------------------------------------------------------------------- combine


def test_combine_masks_all_none_and_single():
    assert combine_masks() is None
    assert combine_masks(None, None) is None
    m = causal_mask(4)
    np.testing.assert_array_equal(combine_masks(None, m), m)


# ----------------------------------------------- references, jitted and eager


class TestMasksJittedAndEager(OpsTestCase):
    """Each reference check runs under `jax.jit` and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_mask_matches_loops(self):
        fx = variant_ops(self.variant)
        valid = self.rng.random((2, 3, 7)) < 0.6
        kv_valid = self.rng.random((1, 3, 5)) < 0.6
        got = fx.padding_mask(valid, kv_valid)
        assert got.dtype == jnp.bool_ and got.shape == (2, 3, 7, 5)
        np.testing.assert_array_equal(got, padding_reference(valid, kv_valid))

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_mask_self_attention_and_integer_input(self):
        fx = variant_ops(self.variant)
        valid = self.rng.integers(0, 3, size=(4, 6)).astype(np.int32)  # nonzero = valid
        valid[0, 2] = 0
        got = fx.padding_mask(valid)
        np.testing.assert_array_equal(got, padding_reference(valid, valid))
        # A padded token is invisible as a key, and as a query sees nothing.
        assert not np.asarray(got[0, 2]).any() and not np.asarray(got[0, :, 2]).any()

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_mask_from_lengths_is_prefix_block(self):
        fx = variant_ops(self.variant)
        lengths = self.rng.integers(1, 9, size=5)
        valid = np.arange(8)[None, :] < lengths[:, None]
        got = np.asarray(fx.padding_mask(valid))
        for b, n in enumerate(lengths):
            assert got[b].sum() == n * n and got[b, :n, :n].all()

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((5, None, None), (3, 7, None), (4, 4, 1), (4, 6, -2),
                              (6, 3, None), (1, 9, None))
    def test_causal_mask_matches_loops(self, q_len, k_len, offset):
        fx = variant_ops(self.variant)
        got = fx.causal_mask(q_len, k_len, offset=offset)
        k = q_len if k_len is None else k_len
        expected_offset = k - q_len if offset is None else offset
        assert got.dtype == jnp.bool_ and got.shape == (q_len, k)
        np.testing.assert_array_equal(got, causal_reference(q_len, k, expected_offset))

    @chex.variants(with_jit=True, without_jit=True)
    def test_prefix_lm_mask_matches_loops(self):
        fx = variant_ops(self.variant)
        seq_len = 7
        prefix_lengths = self.rng.integers(0, seq_len + 1, size=(2, 3))
        got = fx.prefix_lm_mask(jnp.asarray(prefix_lengths, jnp.int32), seq_len)
        assert got.dtype == jnp.bool_ and got.shape == (2, 3, seq_len, seq_len)
        np.testing.assert_array_equal(got, prefix_lm_reference(prefix_lengths, seq_len))

    @chex.variants(with_jit=True, without_jit=True)
    def test_combine_masks_is_broadcast_and(self):
        fx = variant_ops(self.variant)
        a = self.rng.random((2, 1, 5, 5)) < 0.5
        b = self.rng.random((3, 5, 5)) < 0.5
        c = np.asarray(fx.causal_mask(5))
        got = fx.combine_masks(None, a, b, None, c)
        assert got.shape == (2, 3, 5, 5)
        np.testing.assert_array_equal(got, a & b & c)

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_and_causal_combined_matches_loops(self):
        fx = variant_ops(self.variant)
        valid = self.rng.random((3, 6)) < 0.7
        got = fx.combine_masks(fx.padding_mask(valid), fx.causal_mask(6))
        expected = padding_reference(valid, valid) & causal_reference(6, 6, 0)
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------- transforms


def test_masks_under_jit_and_vmap(rng):
    valid = rng.random((4, 6)) < 0.5
    prefix = rng.integers(0, 7, size=4).astype(np.int32)
    np.testing.assert_array_equal(jax.jit(padding_mask)(valid), padding_reference(valid, valid))
    np.testing.assert_array_equal(jax.vmap(padding_mask)(valid), padding_reference(valid, valid))
    got = jax.jit(prefix_lm_mask, static_argnums=1)(prefix, 6)
    np.testing.assert_array_equal(got, prefix_lm_reference(prefix, 6))
    got = jax.vmap(lambda p: prefix_lm_mask(p, 6))(prefix)
    np.testing.assert_array_equal(got, prefix_lm_reference(prefix, 6))
    combined = jax.jit(lambda v: combine_masks(padding_mask(v), causal_mask(6)))(valid)
    np.testing.assert_array_equal(
        combined, padding_reference(valid, valid) & causal_reference(6, 6, 0))


# -------------------------------------------------------------------------- errors


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`valid` must have a bool or integer dtype.*float32"):
        padding_mask(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"`valid` must have at least 1 axes"):
        padding_mask(np.bool_(True))
    with pytest.raises(ValueError, match=r"`kv_valid` must have a bool or integer dtype"):
        padding_mask(np.ones(4, bool), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"`valid.shape\[:-1\]` with shape \(2,\).*\(3,\)"):
        padding_mask(np.ones((2, 4), bool), np.ones((3, 4), bool))
    with pytest.raises(ValueError, match=r"`q_len` must be positive; got 0"):
        causal_mask(0)
    with pytest.raises(ValueError, match=r"`k_len` must be a Python int; got 2.5"):
        causal_mask(3, 2.5)
    with pytest.raises(ValueError, match=r"`offset` must be a Python int or None; got 1.0"):
        causal_mask(3, offset=1.0)
    with pytest.raises(ValueError, match=r"`prefix_lengths` must have a integer dtype.*float32"):
        prefix_lm_mask(np.float32(2.0), 4)
    with pytest.raises(ValueError, match=r"`seq_len` must be positive; got -1"):
        prefix_lm_mask(np.int32(2), -1)
    with pytest.raises(ValueError, match=r"`masks\[1\]` must have a bool dtype; got dtype int32"):
        combine_masks(causal_mask(3), np.ones((3, 3), np.int32))
    with pytest.raises(ValueError, match=r"`masks\[2\]` with shape \(4, 4\)"):
        combine_masks(causal_mask(3), None, np.ones((4, 4), bool))
