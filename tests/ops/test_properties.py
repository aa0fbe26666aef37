"""The ops' defining properties, stated once each and checked by hypothesis.

Hypothesis draws the sizes, positions, layouts and a seed for the array entries;
shapes come from small fixed menus so that jit compilations stay few. Each property
runs twice (`chex.variants`): under `jax.jit` and eagerly.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kexue import ops
from tests.ops._variants import VARIANT_EXAMPLES, OpsTestCase

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["interleaved", "half"])
positions = st.floats(-4096, 4096, allow_nan=False, width=32)


def _normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _roformer_formula(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """RoFormer (kexue.fm/archives/8265, eq. 13): x ⊙ cos + rotate_every_two(x) ⊙ sin."""
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2) / d)
    angles = pos[:, None, None] * np.repeat(theta, 2)  # (θ0, θ0, θ1, θ1, ...)
    rotated = np.empty_like(x)
    rotated[..., 0::2], rotated[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return x * np.cos(angles) + rotated * np.sin(angles)


def _neox_formula(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """GPT-NeoX / LLaMA: x ⊙ cos + rotate_half(x) ⊙ sin with cat(θ, θ)."""
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2) / d)
    angles = pos[:, None, None] * np.concatenate([theta, theta])
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


class TestPropertiesJittedAndEager(OpsTestCase):
    """Each property holds under `jax.jit` and eagerly (positions are host values, so
    both use the float64 angle table)."""

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, layout=layouts, m=positions, n=positions, d=st.sampled_from([8, 32]))
    def test_rope_relativity_and_norm_1d(self, seed, layout, m, n, d):
        """⟨R_m q, R_n k⟩ = ⟨q, R_{n−m} k⟩ and ‖R_m q‖ = ‖q‖."""
        def rope(x, position):
            return self.variant(lambda x: ops.apply_rope(x, np.array([position]),
                                                         layout=layout))(x)

        q, k = _normal(seed, 1, 1, d), _normal(seed + 1, 1, 1, d)
        m_rot = rope(q, m)
        lhs = jnp.vdot(m_rot, rope(k, n))
        rhs = jnp.vdot(q, rope(k, np.float64(n) - np.float64(m)))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(m_rot), np.linalg.norm(q), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, layout=layouts, p=st.tuples(positions, positions),
           r=st.tuples(positions, positions))
    def test_rope_relativity_and_norm_2d(self, seed, layout, p, r):
        """2-D RoPE: ⟨R_p q, R_r k⟩ = ⟨q, R_{r−p} k⟩ for (row, col) positions."""
        def rope(x, position):
            return self.variant(lambda x: ops.apply_rope_nd(x, position, layout=layout))(x)

        q, k = _normal(seed, 1, 1, 16), _normal(seed + 1, 1, 1, 16)
        p64, r64 = np.array([p], np.float64), np.array([r], np.float64)
        p_rot = rope(q, p64)
        lhs = jnp.vdot(p_rot, rope(k, r64))
        rhs = jnp.vdot(q, rope(k, r64 - p64))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(p_rot), np.linalg.norm(q), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, base=st.sampled_from([100.0, 10000.0, 500000.0]),
           n=st.sampled_from([3, 9]))
    def test_layouts_are_the_roformer_and_neox_formulas(self, seed, base, n):
        x = np.random.default_rng(seed).normal(size=(n, 2, 16))
        pos = np.random.default_rng(seed + 1).uniform(-300, 300, size=n)
        for layout, formula in (("interleaved", _roformer_formula), ("half", _neox_formula)):
            rope = self.variant(lambda x, layout=layout: ops.apply_rope(x, pos, base=base,
                                                                        layout=layout))
            np.testing.assert_allclose(rope(x.astype(np.float32)), formula(x, pos, base),
                                       rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, base=st.sampled_from([16, 64, 512]), masked=st.booleans())
    def test_entropy_invariant_equals_standard_at_the_entropy_base(self, seed, base, masked):
        """With exactly `entropy_base` visible keys, log_b(n) = 1: standard attention."""
        attention = self.variant(ops.dot_product_attention,
                                 static_argnames=("scale", "entropy_base"))
        extra = 5 if masked else 0  # keys that the mask hides
        q = _normal(seed, 1, 4, 2, 8)
        k, v = _normal(seed + 1, 1, base + extra, 2, 8), _normal(seed + 2, 1, base + extra, 2, 8)
        mask = None
        if masked:
            mask = np.ones((1, 4, base + extra), bool)
            mask[..., :extra] = False
        standard = attention(q, k, v, mask=mask)
        invariant = attention(q, k, v, mask=mask, scale="entropy_invariant",
                              entropy_base=float(base))
        np.testing.assert_allclose(invariant, standard, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, shape=st.sampled_from([(4, 7), (2, 3, 11)]))
    def test_zlpr_soft_form_equals_hard_form_on_binary_labels(self, seed, shape):
        zlpr = self.variant(ops.zlpr_loss)
        rng = np.random.default_rng(seed)
        logits = rng.normal(scale=3.0, size=shape).astype(np.float32)
        hard = rng.random(shape) < 0.3
        np.testing.assert_allclose(zlpr(logits, hard.astype(np.float32)), zlpr(logits, hard),
                                   rtol=1e-6)
        # The hard form itself: log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s), in float64.
        s = logits.astype(np.float64)
        expected = (np.log1p(np.sum(np.where(hard, 0, np.exp(s)), -1))
                    + np.log1p(np.sum(np.where(hard, np.exp(-s), 0), -1)))
        np.testing.assert_allclose(zlpr(logits, hard), expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, classes=st.sampled_from([6, 40]), max_positives=st.sampled_from([1, 5]))
    def test_sparse_zlpr_equals_dense(self, seed, classes, max_positives):
        sparse, dense_loss = self.variant(ops.sparse_zlpr_loss), self.variant(ops.zlpr_loss)
        rng = np.random.default_rng(seed)
        logits = rng.normal(scale=4.0, size=(3, classes)).astype(np.float32)
        indices = np.full((3, max_positives), -1, np.int32)
        dense = np.zeros((3, classes), bool)
        for row in range(3):
            count = rng.integers(0, max_positives + 1)
            chosen = rng.choice(classes, size=count, replace=False)
            indices[row, :count], dense[row, chosen] = chosen, True
        np.testing.assert_allclose(sparse(logits, indices), dense_loss(logits, dense),
                                   rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(seed=seeds, shape=st.sampled_from([(5,), (2, 3, 4)]))
    def test_global_pointer_kl_is_the_summed_bernoulli_kls(self, seed, shape):
        """Σ_i [KL(B_s‖B_t) + KL(B_t‖B_s)] for per-entry Bernoulli(σ(·)), in float64."""
        rng = np.random.default_rng(seed)
        s, t = (rng.normal(scale=2.0, size=shape).astype(np.float32) for _ in range(2))
        p, q = (1 / (1 + np.exp(-x.astype(np.float64))) for x in (s, t))

        def kl(a, b):
            return a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))

        expected = np.sum(kl(p, q) + kl(q, p), axis=-1)
        np.testing.assert_allclose(self.variant(ops.global_pointer_kl)(s, t), expected,
                                   rtol=1e-5, atol=1e-6)


def test_zlpr_labels_outside_unit_interval_are_rejected():
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 1\].*\[-0.5, 1.0\]"):
        ops.zlpr_loss(np.zeros((2, 2), np.float32), np.array([[0.0, 1.0], [-0.5, 0.5]]))
