"""Attention against a float64 NumPy softmax loop; entropy invariance; masks, GQA, transforms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kexue.ops.attention import dot_product_attention, entropy_invariant_scale
from kexue.ops.masks import causal_mask, combine_masks, padding_mask, prefix_lm_mask
from tests.ops._variants import OpsTestCase

TOL = {"rtol": 2e-5, "atol": 2e-5}


def variant_ops(variant) -> SimpleNamespace:
    """The ops through a chex variant (`self.variant`: under `jax.jit`, or eagerly)."""
    return SimpleNamespace(
        attention=variant(dot_product_attention, static_argnames=("scale", "entropy_base")),
        entropy_invariant_scale=variant(entropy_invariant_scale,
                                        static_argnames="entropy_base"),
    )


def full_mask(mask, batch, h, n_q, n_k):
    """The documented reading of `mask`: fewer axes than q -> `[..., n_q, n_k]`, shared by
    the heads; as many as q (`len(batch) + 3`) -> `[..., h, n_q, n_k]`."""
    if mask is None:
        return np.ones((*batch, h, n_q, n_k), bool)
    mask = np.asarray(mask)
    if mask.ndim < len(batch) + 3:
        mask = mask[..., None, :, :]
    return np.broadcast_to(mask, (*batch, h, n_q, n_k))


def attention_reference(q, k, v, mask=None, scale="standard", entropy_base=512.0):
    """Float64 loop over (batch, head, query): softmax over the visible keys only."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    *batch, n_q, h, d = q.shape
    n_k, h_kv = k.shape[-3], k.shape[-2]
    group = h // h_kv
    mask = full_mask(mask, batch, h, n_q, n_k)
    out = np.zeros(q.shape)
    for idx in np.ndindex(*batch):
        for head in range(h):
            kv_head = head // group
            for i in range(n_q):
                visible = np.flatnonzero(mask[(*idx, head, i)])
                if visible.size == 0:
                    continue
                if scale == "standard":
                    kappa = 1 / math.sqrt(d)
                elif scale == "entropy_invariant":
                    kappa = math.log(visible.size) / math.log(entropy_base) / math.sqrt(d)
                else:
                    kappa = scale
                logits = np.array([kappa * q[(*idx, i, head)] @ k[(*idx, j, kv_head)]
                                   for j in visible])
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                out[(*idx, i, head)] = sum(w * v[(*idx, j, kv_head)]
                                           for w, j in zip(weights, visible, strict=True))
    return out


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, batch=(2,), n_q=6, n_k=6, h=4, h_kv=2, d=8, dtype=np.float32):
    return (randn(rng, *batch, n_q, h, d, dtype=dtype),
            randn(rng, *batch, n_k, h_kv, d, dtype=dtype),
            randn(rng, *batch, n_k, h_kv, d, dtype=dtype))


def make_mask(kind, rng, batch, h, n_q, n_k):
    """Masks in every accepted form (some with fully masked rows)."""
    if kind == "none":
        return None
    if kind == "padding":
        valid = rng.random((*batch, n_k)) < 0.7
        valid[..., 0] = False  # query 0 of every sequence is padding -> fully masked row
        return padding_mask(valid)
    if kind == "key_padding":  # [..., 1, n_k]: broadcast over queries
        return jnp.asarray(rng.random((*batch, 1, n_k)) < 0.6)
    if kind == "causal":
        return causal_mask(n_q, n_k)
    if kind == "prefix_and_padding":
        prefix = rng.integers(0, n_q + 1, size=batch).astype(np.int32)
        valid = np.arange(n_q) < rng.integers(1, n_q + 1, size=(*batch, 1))
        return combine_masks(prefix_lm_mask(prefix, n_q), padding_mask(valid))
    if kind == "per_head":  # [..., h, n_q, n_k]
        return jnp.asarray(rng.random((*batch, h, n_q, n_k)) < 0.5)
    raise AssertionError(kind)


# ------------------------------------------------------------------------ reference


# ---------------------------------------------------------------- entropy invariance


def attention_entropy(attention, q, keys, scale):
    """Mean entropy of the weights of `attention` (a `dot_product_attention`) for queries
    `q [n_q, d]` over `keys [n, d]`.

    The values are the identity matrix, so each output row is the attention distribution
    itself; the features are zero-padded to width `n`, with `q` scaled by `√(n/d)` so that
    the logits stay `q·k/√d` under the padded standard scale `1/√n`.
    """
    (n_q, d), n = q.shape, keys.shape[0]
    q_pad = np.zeros((n_q, 1, n), np.float32)
    k_pad = np.zeros((n, 1, n), np.float32)
    q_pad[:, 0, :d] = q * math.sqrt(n / d)
    k_pad[:, 0, :d] = keys
    values = np.eye(n, dtype=np.float32)[:, None, :]
    weights = np.asarray(attention(q_pad, k_pad, values, scale=scale), np.float64)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-4)
    return float(np.mean(-np.sum(weights * np.log(np.maximum(weights, 1e-30)), axis=-1)))


# --------------------------------------------------------------- masked rows, grads


class TestAttentionJittedAndEager(OpsTestCase):
    """Each reference and property check runs under `jax.jit` and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(scale=["standard", "entropy_invariant", 0.37],
                           kind=["none", "padding", "key_padding", "causal",
                                 "prefix_and_padding", "per_head"])
    def test_matches_softmax_loop(self, scale, kind):
        fx = variant_ops(self.variant)
        q, k, v = qkv(self.rng)
        mask = make_mask(kind, self.rng, (2,), 4, 6, 6)
        got = fx.attention(q, k, v, mask=mask, scale=scale, entropy_base=64.0)
        assert got.shape == q.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, attention_reference(q, k, v, mask, scale, 64.0), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((6, 6), (6, 3), (6, 1))
    def test_grouped_query_heads(self, h, h_kv):
        fx = variant_ops(self.variant)
        # Query head j reads key/value head j // (h / h_kv); extra batch axes, n_q != n_k.
        q, k, v = qkv(self.rng, batch=(2, 2), n_q=3, n_k=7, h=h, h_kv=h_kv, d=4)
        mask = causal_mask(3, 7)  # decoding: the 3 queries are the last 3 positions
        got = fx.attention(q, k, v, mask=mask, scale="entropy_invariant")
        np.testing.assert_allclose(
            got, attention_reference(q, k, v, mask, "entropy_invariant"), **TOL)
        # Same as repeating each key/value head for its group of query heads.
        rep = h // h_kv
        expanded = fx.attention(q, np.repeat(k, rep, axis=-2), np.repeat(v, rep, axis=-2),
                                mask=mask, scale="entropy_invariant")
        np.testing.assert_allclose(got, expanded, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unbatched_inputs(self):
        fx = variant_ops(self.variant)
        q, k, v = qkv(self.rng, batch=(), n_q=5, n_k=4, h=2, h_kv=1, d=8)
        mask = np.asarray(self.rng.random((5, 4)) < 0.6)
        got = fx.attention(q, k, v, mask=mask, scale="entropy_invariant")
        assert got.shape == (5, 2, 8)
        np.testing.assert_allclose(
            got, attention_reference(q, k, v, mask, "entropy_invariant"), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_invariant_scale_formula(self):
        fx = variant_ops(self.variant)
        n = np.array([0, 1, 2, 7, 64, 512, 4096])
        got = fx.entropy_invariant_scale(jnp.asarray(n, jnp.int32))
        assert got.dtype == jnp.float32 and got.shape == n.shape
        np.testing.assert_allclose(got, np.log(np.maximum(n, 1)) / np.log(512.0), rtol=1e-6)
        assert float(fx.entropy_invariant_scale(512)) == pytest.approx(1.0, abs=1e-7)
        np.testing.assert_allclose(fx.entropy_invariant_scale(np.float32(100.0), entropy_base=10),
                                   2.0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_invariant_equals_standard_at_the_base_length(self):
        fx = variant_ops(self.variant)
        q, k, v = qkv(self.rng, batch=(1,), n_q=4, n_k=512, h=2, h_kv=2, d=8)
        standard = fx.attention(q, k, v)
        np.testing.assert_array_equal(
            fx.attention(q, k, v, scale="entropy_invariant"), standard)
        # With a mask the factor is per query: rows that see exactly 512 keys are standard.
        mask = np.ones((4, 512), bool)
        mask[1, 300:] = False
        mask[3, :] = False
        got = np.asarray(fx.attention(q, k, v, mask=mask, scale="entropy_invariant"))
        masked_standard = np.asarray(fx.attention(q, k, v, mask=mask))
        np.testing.assert_allclose(got[:, [0, 2]], masked_standard[:, [0, 2]], rtol=1e-5, atol=1e-6)
        assert not np.allclose(got[:, 1], masked_standard[:, 1], atol=1e-3)
        np.testing.assert_array_equal(got[:, 3], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_invariant_is_standard_times_log_ratio(self):
        fx = variant_ops(self.variant)
        n_k, d = 40, 8
        q, k, v = qkv(self.rng, batch=(2,), n_q=n_k, n_k=n_k, h=2, h_kv=1, d=d)
        ratio = math.log(n_k) / math.log(512.0)
        np.testing.assert_allclose(
            fx.attention(q, k, v, scale="entropy_invariant"),
            fx.attention(q, k, v, scale=ratio / math.sqrt(d)), rtol=1e-5, atol=1e-6)
        # Causal: query i sees i + 1 keys, so row i uses log(i + 1) / log(512) / sqrt(d).
        mask = causal_mask(n_k)
        got = np.asarray(fx.attention(q, k, v, mask=mask, scale="entropy_invariant"))
        for i in (0, 1, 9, n_k - 1):
            row = fx.attention(q, k, v, mask=mask,
                               scale=math.log(i + 1) / math.log(512.0) / math.sqrt(d))
            np.testing.assert_allclose(got[:, i], np.asarray(row)[:, i], rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_grows_much_less_with_length(self):
        """Archive 8823: with log_512(n)/√d the attention entropy hardly grows with n.

        Logits `q·k/√d` of i.i.d. keys are N(0, σ²) with σ = 3 (queries of norm σ√d). Under the
        standard scale the entropy grows by about 1.6 nats here; entropy-invariant by about 0.35.
        """
        fx = variant_ops(self.variant)
        d, sigma = 16, 3.0
        q = randn(self.rng, 256, d)
        q *= sigma * math.sqrt(d) / np.linalg.norm(q, axis=-1, keepdims=True)
        keys = randn(self.rng, 1024, d)
        lengths = (64, 1024)
        standard = [attention_entropy(fx.attention, q, keys[:n], "standard") for n in lengths]
        invariant = [attention_entropy(fx.attention, q, keys[:n], "entropy_invariant")
                     for n in lengths]
        growth_standard = standard[1] - standard[0]
        growth_invariant = invariant[1] - invariant[0]
        assert growth_standard > 1.2, standard
        assert abs(growth_invariant) < 0.5 * growth_standard, (standard, invariant)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fully_masked_rows_are_zero_with_finite_grads(self):
        fx = variant_ops(self.variant)
        q, k, v = qkv(self.rng, batch=(2,), n_q=5, n_k=5, h=2, h_kv=2, d=4)
        valid = np.array([[True, True, True, False, False], [False] * 5])
        mask = padding_mask(valid)

        for scale in ("standard", "entropy_invariant"):
            out = fx.attention(q, k, v, mask=mask, scale=scale)
            np.testing.assert_array_equal(np.asarray(out)[0, 3:], 0.0)
            np.testing.assert_array_equal(np.asarray(out)[1], 0.0)

            def loss(q, k, v, scale=scale):
                return jnp.sum(fx.attention(q, k, v, mask=mask, scale=scale) ** 2)

            grads = self.variant(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            for g in grads:
                assert np.all(np.isfinite(g))
            # Masked queries, and keys nobody sees, get no gradient.
            np.testing.assert_array_equal(np.asarray(grads[0])[0, 3:], 0.0)
            np.testing.assert_array_equal(np.asarray(grads[1])[0, 3:], 0.0)
            np.testing.assert_array_equal(np.asarray(grads[2])[1], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("standard", "entropy_invariant")
    def test_grad_matches_reference_directional_derivative(self, scale):
        fx = variant_ops(self.variant)
        q, k, v = qkv(self.rng, batch=(1,), n_q=4, n_k=5, h=2, h_kv=1, d=4)
        mask = combine_masks(causal_mask(4, 5), padding_mask(np.ones(4, bool),
                                                             np.array([1, 1, 0, 1, 1], bool)))
        w = randn(self.rng, *q.shape)
        directions = [randn(self.rng, *t.shape) for t in (q, k, v)]

        def loss(q, k, v):
            return jnp.sum(w * fx.attention(q, k, v, mask=mask, scale=scale))

        grads = self.variant(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        eps = 1e-4
        for i, (g, u) in enumerate(zip(grads, directions, strict=True)):
            plus = [np.asarray(t, np.float64) for t in (q, k, v)]
            minus = [t.copy() for t in plus]
            plus[i] = plus[i] + eps * u
            minus[i] = minus[i] - eps * u
            numeric = np.sum(w * (attention_reference(*plus, mask, scale)
                                  - attention_reference(*minus, mask, scale))) / (2 * eps)
            np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * u), numeric,
                                       rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- transforms


def test_jit_and_vmap(rng):
    q, k, v = qkv(rng, batch=(3,), n_q=5, n_k=5, h=2, h_kv=1, d=8)
    valid = rng.random((3, 5)) < 0.8
    mask = combine_masks(padding_mask(valid), causal_mask(5))
    expected = attention_reference(q, k, v, mask, "entropy_invariant")

    def fn(q, k, v, mask):
        return dot_product_attention(q, k, v, mask=mask, scale="entropy_invariant")

    np.testing.assert_allclose(jax.jit(fn)(q, k, v, mask), expected, **TOL)
    np.testing.assert_allclose(jax.vmap(fn)(q, k, v, mask), expected, **TOL)


def test_bfloat16_keeps_dtype(rng):
    q, k, v = (t.astype(jnp.bfloat16) for t in qkv(rng, batch=(2,), n_q=6, n_k=6))
    mask = causal_mask(6)
    for scale in ("standard", "entropy_invariant"):
        got = dot_product_attention(q, k, v, mask=mask, scale=scale)
        assert got.dtype == jnp.bfloat16
        expected = attention_reference(*(np.asarray(t, np.float32) for t in (q, k, v)), mask,
                                       scale)
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=3e-2, atol=3e-2)


def test_sharded_batch_gives_same_result(rng):
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q, k, v = qkv(rng, batch=(8,), n_q=4, n_k=4, h=2, h_kv=1, d=4)
    valid = rng.random((8, 4)) < 0.8
    mask = padding_mask(valid)
    sharded = [jax.device_put(t, sharding) for t in (q, k, v, mask)]

    @jax.jit
    def fn(q, k, v, mask):
        return dot_product_attention(q, k, v, mask=mask, scale="entropy_invariant")

    got = fn(*sharded)
    np.testing.assert_allclose(got, attention_reference(q, k, v, mask, "entropy_invariant"),
                               **TOL)


# -------------------------------------------------------------------------- errors


def test_attention_errors_name_the_argument():
    q = np.zeros((2, 5, 4, 8), np.float32)
    kv = np.zeros((2, 6, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"`q` must have at least 3 axes.*\(5, 8\)"):
        dot_product_attention(np.zeros((5, 8), np.float32), kv, kv)
    with pytest.raises(ValueError, match=r"`k` must be a floating-point array; got dtype int32"):
        dot_product_attention(q, kv.astype(np.int32), kv)
    with pytest.raises(ValueError, match=r"`k` and `v` must have the same shape"):
        dot_product_attention(q, kv, kv[:, :5])
    with pytest.raises(ValueError, match=r"same dtype; got q.dtype=float32, k.dtype=bfloat16"):
        dot_product_attention(q, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"same leading \(batch\) axes"):
        dot_product_attention(q, kv[:1], kv[:1])
    with pytest.raises(ValueError, match=r"`k` must have size 8 on axis -1.*\(2, 6, 2, 4\)"):
        dot_product_attention(q, kv[..., :4], kv[..., :4])
    with pytest.raises(ValueError, match=r"multiple of the key/value heads.*h=4.*h_kv=3"):
        dot_product_attention(q, np.zeros((2, 6, 3, 8), np.float32),
                              np.zeros((2, 6, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"`scale` must be one of \['standard', 'entropy_inv"):
        dot_product_attention(q, kv, kv, scale="log")
    with pytest.raises(ValueError, match=r"`scale` must be one of .* Python number; got nan"):
        dot_product_attention(q, kv, kv, scale=float("nan"))
    with pytest.raises(ValueError, match=r"`entropy_base` must be a finite number greater than 1"):
        dot_product_attention(q, kv, kv, scale="entropy_invariant", entropy_base=1.0)
    with pytest.raises(ValueError, match=r"`entropy_base`.*got 0"):
        entropy_invariant_scale(10, entropy_base=0)
    with pytest.raises(ValueError, match=r"`num_keys` must have a integer or floating dtype"):
        entropy_invariant_scale(np.ones(3, bool))
    with pytest.raises(ValueError, match=r"`mask` must have a bool dtype; got dtype int32"):
        dot_product_attention(q, kv, kv, mask=np.ones((5, 6), np.int32))
    with pytest.raises(ValueError, match=r"`mask` with shape \(5, 5\) \(read as \[..., n_q, n_k"):
        dot_product_attention(q, kv, kv, mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match=r"`mask` with shape \(2, 3, 5, 6\) \(read as \[..., h,"):
        dot_product_attention(q, kv, kv, mask=np.ones((2, 3, 5, 6), bool))
    with pytest.raises(ValueError, match=r"`mask` must have at most 4 axes"):
        dot_product_attention(q, kv, kv, mask=np.ones((1, 2, 4, 5, 6), bool))
