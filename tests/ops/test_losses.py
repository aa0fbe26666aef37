"""ZLPR (hard, soft, sparse) and the symmetric KL losses against float64 NumPy references."""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue.ops import _checks
from kexue.ops.losses import global_pointer_kl, softmax_kl, sparse_zlpr_loss, zlpr_loss
from tests.ops._variants import OpsTestCase

# Jitted once per shape, for the tests outside the jitted-and-eager variants.
zlpr = jax.jit(zlpr_loss, static_argnames="axis")
sparse_zlpr = jax.jit(sparse_zlpr_loss)
gp_kl = jax.jit(global_pointer_kl, static_argnames="axis")
sm_kl = jax.jit(softmax_kl, static_argnames="axis")


def grad_of(fn):
    return jax.jit(jax.grad(fn))


def variant_ops(variant) -> SimpleNamespace:
    """The losses, their derivatives and the sparse / dense value-and-gradients through
    a chex variant (`self.variant`: under `jax.jit`, or eagerly)."""
    return SimpleNamespace(
        zlpr=variant(zlpr_loss, static_argnames="axis"),
        sparse_zlpr=variant(sparse_zlpr_loss),
        gp_kl=variant(global_pointer_kl, static_argnames="axis"),
        sm_kl=variant(softmax_kl, static_argnames="axis"),
        vgrad=lambda fn: variant(jax.value_and_grad(fn)),
        grad_of=lambda fn: variant(jax.grad(fn)),
        sparse_value_and_grad=variant(lambda s, indices, mask: jax.value_and_grad(
            lambda x: jnp.sum(sparse_zlpr_loss(x, indices, where=mask)))(s)),
        dense_value_and_grad=variant(lambda s, labels, mask: jax.value_and_grad(
            lambda x: jnp.sum(zlpr_loss(x, labels, where=mask)))(s)),
    )


def log1p_sum_exp_ref(a: np.ndarray, weights: np.ndarray) -> float:
    """`log(1 + Σ w e^a)` in float64 with the max pulled out by hand."""
    a, weights = np.asarray(a, np.float64), np.asarray(weights, np.float64)
    used = weights > 0  # entries of weight 0 are left out (their e^(a−top) may overflow)
    top = max(0.0, float(np.max(a[used]))) if np.any(used) else 0.0
    return top + np.log(np.exp(-top) + np.sum(weights[used] * np.exp(a[used] - top)))


def zlpr_ref(s: np.ndarray, t: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """`[B]` loss of rows `[B, C]`: log(1 + Σ (1−t) e^s) + log(1 + Σ t e^{−s}) over unmasked."""
    out = []
    for b in range(s.shape[0]):
        keep = np.ones(s.shape[1], bool) if mask is None else mask[b]
        sb, tb = s[b][keep], t[b][keep].astype(np.float64)
        out.append(log1p_sum_exp_ref(sb, 1 - tb) + log1p_sum_exp_ref(-sb, tb))
    return np.array(out)


def zlpr_grad_ref(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d loss / d s for one row, from the closed form."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    neg = (1 - t) * np.exp(s) / (1 + np.sum((1 - t) * np.exp(s)))
    pos = t * np.exp(-s) / (1 + np.sum(t * np.exp(-s)))
    return neg - pos


def random_labels(rng, shape, p=0.3):
    return rng.random(shape) < p


def zlpr_label_grad_ref(s: np.ndarray, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """d loss / d t for one row, from the closed form (0 where `keep` is False).

    `∂/∂t_i [log(1 + Σ (1−t) e^s) + log(1 + Σ t e^{−s})]
     = −e^{s_i} / (1 + Σ (1−t) e^s) + e^{−s_i} / (1 + Σ t e^{−s})`, sums over `keep`.
    """
    s, t = s.astype(np.float64), t.astype(np.float64)
    neg = 1 + np.sum(np.where(keep, (1 - t) * np.exp(s), 0))
    pos = 1 + np.sum(np.where(keep, t * np.exp(-s), 0))
    return np.where(keep, -np.exp(s) / neg + np.exp(-s) / pos, 0)


def test_zlpr_bf16_jit_vmap(rng):
    s = rng.normal(size=(3, 8)).astype(np.float32)
    t = random_labels(rng, s.shape)
    got = zlpr_loss(jnp.asarray(s, jnp.bfloat16), t)  # eager
    assert got.dtype == jnp.float32
    s_rounded = np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(got, zlpr_ref(s_rounded, t), rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(zlpr)(s, t), zlpr(s, t), rtol=1e-6)
    grad = grad_of(lambda x: jnp.sum(zlpr(x, t)))(jnp.asarray(s, jnp.bfloat16))
    assert grad.dtype == jnp.bfloat16


def sparse_case(rng, batch=4, classes=20, max_pos=6):
    """Logits, padded positive indices (with repeats and padding), dense 0/1 labels."""
    s = rng.normal(scale=2.0, size=(batch, classes)).astype(np.float32)
    indices = np.full((batch, max_pos), -1, np.int32)
    dense = np.zeros((batch, classes), bool)
    for b in range(batch):
        count = int(rng.integers(0, max_pos + 1))
        chosen = rng.integers(0, classes, size=count)  # may repeat
        indices[b, :count] = chosen
        dense[b, chosen] = True
        rng.shuffle(indices[b])  # padding anywhere, not just at the end
    return s, indices, dense


def bernoulli_sym_kl_ref(s, t):
    p, q = 1 / (1 + np.exp(-s.astype(np.float64))), 1 / (1 + np.exp(-t.astype(np.float64)))

    def kl(a, b):
        return a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))

    return kl(p, q) + kl(q, p)


def softmax_sym_kl_ref(s, t, mask=None):
    out = []
    for b in range(s.shape[0]):
        keep = np.ones(s.shape[1], bool) if mask is None else mask[b]
        if not keep.any():
            out.append(0.0)
            continue
        sb, tb = s[b][keep].astype(np.float64), t[b][keep].astype(np.float64)
        p, q = np.exp(sb - sb.max()), np.exp(tb - tb.max())
        p, q = p / p.sum(), q / q.sum()
        out.append(np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
    return np.array(out)


class TestLossesJittedAndEager(OpsTestCase):
    """Each reference and property check runs under `jax.jit` and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_hard_matches_reference_and_gradient(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(scale=2.0, size=(4, 12)).astype(np.float32)
        t = random_labels(self.rng, s.shape)
        t[0] = False  # no positives in one row, only positives in another
        t[1] = True
        got = v.zlpr(s, t)
        assert got.shape == (4,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, zlpr_ref(s, t), rtol=1e-5, atol=1e-6)
        grad = v.grad_of(lambda x: jnp.sum(v.zlpr(x, t)))(jnp.asarray(s))
        want = np.stack([zlpr_grad_ref(s[b], t[b]) for b in range(4)])
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_equals_pairwise_multilabel_softmax(self):
        """log(1 + Σ_{i∈neg∪{0}, j∈pos∪{0}, (i,j)≠(0,0)} e^{s_i − s_j}), s_0 = 0 (archive 7359)."""
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(3, 7)).astype(np.float32)
        t = random_labels(self.rng, s.shape, 0.4)
        want = []
        for b in range(3):
            neg = [0.0] + [float(x) for x in s[b][~t[b]]]
            pos = [0.0] + [float(x) for x in s[b][t[b]]]
            total = sum(np.exp(si - sj) for si in neg for sj in pos)  # includes the (0, 0) term 1
            want.append(np.log(total))
        np.testing.assert_allclose(v.zlpr(s, t), want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_soft_labels(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(3, 9)).astype(np.float32)
        soft = self.rng.random(s.shape).astype(np.float32)
        soft[:, 0], soft[:, 1] = 0.0, 1.0
        np.testing.assert_allclose(v.zlpr(s, soft), zlpr_ref(s, soft), rtol=1e-5)
        hard = random_labels(self.rng, s.shape)
        np.testing.assert_allclose(v.zlpr(s, hard.astype(np.float32)), v.zlpr(s, hard),
                                   rtol=1e-6)
        np.testing.assert_allclose(v.zlpr(s, hard.astype(np.int32)), zlpr_ref(s, hard),
                                   rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_label_gradient_matches_closed_form_and_one_sided_differences(self):
        """d/dt at t = 0 and t = 1 (where an entry leaves one of the two sums) and inside."""
        s = self.rng.normal(scale=1.5, size=(5, 9))
        t = self.rng.random(s.shape)
        t[self.rng.random(s.shape) < 0.3] = 0.0
        t[self.rng.random(s.shape) < 0.3] = 1.0
        t[4] = self.rng.random(9) < 0.4  # a row of hard labels
        s[0, :4], t[0, :4] = [0.3, -1.2, 2.0, 0.5], [1.0, 0.0, 0.4, 0.7]
        keep = self.rng.random(s.shape) < 0.8
        keep[0] = np.arange(9) < 4  # row 0 is the 4-entry example
        want = np.stack([zlpr_label_grad_ref(s[b], t[b], keep[b]) for b in range(5)])
        np.testing.assert_allclose(want[0, :4], [0.117076, 1.447517, -1.125213, 0.008596],
                                   atol=1e-6)
        with jax.enable_x64(True):
            def loss(labels):
                return jnp.sum(zlpr_loss(jnp.asarray(s), labels, where=keep))

            got = np.asarray(self.variant(jax.grad(loss))(jnp.asarray(t)))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
            # One-sided differences of the loss itself, stepping into [0, 1].
            value = self.variant(loss)
            h = 1e-6
            step = np.where(t < 0.5, h, -h)
            base = float(value(jnp.asarray(t)))
            diffs = np.zeros_like(t)
            for b, i in np.ndindex(*t.shape):
                moved = t.copy()
                moved[b, i] += step[b, i]
                diffs[b, i] = (float(value(jnp.asarray(moved))) - base) / step[b, i]
        np.testing.assert_allclose(got, diffs, rtol=1e-4, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_axis_tuple_is_flattening(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
        t = random_labels(self.rng, s.shape, 0.1)
        per_type = v.zlpr(s, t, axis=(-2, -1))
        assert per_type.shape == (2, 3)
        np.testing.assert_allclose(per_type, zlpr_ref(s.reshape(6, 16), t.reshape(6, 16))
                                   .reshape(2, 3), rtol=1e-5)
        per_example = v.zlpr(s, t, axis=(1, 2, 3))
        np.testing.assert_allclose(per_example, zlpr_ref(s.reshape(2, -1), t.reshape(2, -1)),
                                   rtol=1e-5)
        first_axis = v.zlpr(np.moveaxis(s, -1, 0), np.moveaxis(t, -1, 0), axis=0)
        np.testing.assert_allclose(first_axis, v.zlpr(s, t), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_where_excludes_entries(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(4, 10)).astype(np.float32)
        t = random_labels(self.rng, s.shape, 0.4)
        mask = self.rng.random(s.shape) < 0.6
        mask[3] = False  # a fully masked row
        want = zlpr_ref(s, t, mask)
        assert want[3] == 0.0
        garbage = np.where(mask, s, np.float32(np.nan))  # masked scores may hold anything
        got, grad = v.vgrad(lambda x: jnp.sum(v.zlpr(x, t, where=mask)))(garbage)
        per_row = v.zlpr(garbage, t, where=mask)
        np.testing.assert_allclose(per_row, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, want.sum(), rtol=1e-5)
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)
        # A `[C]` where broadcasts over the batch.
        np.testing.assert_allclose(v.zlpr(s, t, where=mask[0]),
                                   zlpr_ref(s, t, np.broadcast_to(mask[0], s.shape)), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zlpr_stable_for_large_and_masked_logits(self):
        v = variant_ops(self.variant)
        s = (self.rng.normal(size=(2, 8)) * 300).astype(np.float32)
        t = random_labels(self.rng, s.shape, 0.5)
        got = v.zlpr(s, t)
        np.testing.assert_allclose(got, zlpr_ref(s, t), rtol=1e-5)
        # GlobalPointer-style masked logits (finite large negative) as plain negatives.
        neg = _checks.large_negative(jnp.float32)
        s_masked = np.full((1, 6), neg, np.float32)
        value, grad = v.vgrad(lambda x: jnp.sum(v.zlpr(x, np.zeros((1, 6), bool))))(
            jnp.asarray(s_masked))
        assert float(value) == 0.0 and np.all(np.isfinite(grad))

    @chex.variants(with_jit=True, without_jit=True)
    def test_sparse_zlpr_equals_dense_with_grads(self):
        v = variant_ops(self.variant)
        for _ in range(3):
            s, indices, dense = sparse_case(self.rng)
            mask = self.rng.random(s.shape) < 0.8
            for m in (None, mask):
                sparse_value, sparse_grad = v.sparse_value_and_grad(s, indices, m)
                dense_value, dense_grad = v.dense_value_and_grad(s, dense, m)
                np.testing.assert_allclose(sparse_value, dense_value, rtol=1e-5)
                np.testing.assert_allclose(sparse_grad, dense_grad, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(v.sparse_zlpr(s, indices, where=m),
                                           zlpr_ref(s, dense, m), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sparse_zlpr_on_global_pointer_logits(self):
        v = variant_ops(self.variant)
        batch, types, n = 2, 3, 5
        s = self.rng.normal(size=(batch, types, n, n)).astype(np.float32)
        spans = [[(0, 1, 3), (2, 0, 0), (2, 0, 0)], [(1, 4, 4)]]
        dense = np.zeros(s.shape, bool)
        indices = np.full((batch, 4), -1, np.int32)
        for b, entities in enumerate(spans):
            for p, (t, i, j) in enumerate(entities):
                dense[b, t, i, j] = True
                indices[b, p] = t * n * n + i * n + j
        got = v.sparse_zlpr(s.reshape(batch, -1), indices)
        np.testing.assert_allclose(got, v.zlpr(s, dense, axis=(-3, -2, -1)), rtol=1e-5)
        np.testing.assert_allclose(got, zlpr_ref(s.reshape(batch, -1), dense.reshape(batch, -1)),
                                   rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sparse_zlpr_edge_cases(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(3, 8)).astype(np.float32)
        # All padding == no positives; out-of-range indices are padding too.
        none = np.array([[-1, -1], [8, -5], [-1, 100]], np.int32)
        np.testing.assert_allclose(v.sparse_zlpr(s, none), zlpr_ref(s, np.zeros_like(s, bool)),
                                   rtol=1e-5)
        # Every class positive: the negative part is log 1 = 0.
        every = np.tile(np.arange(8, dtype=np.int32), (3, 1))
        np.testing.assert_allclose(v.sparse_zlpr(s, every), zlpr_ref(s, np.ones_like(s, bool)),
                                   rtol=1e-5, atol=1e-5)
        # Confident positives far above the negatives (a trained model): exactly the dense
        # value and gradient, where the subtraction form of the loss cancels to garbage.
        confident = s.copy()
        confident[:, 0] = self.rng.uniform(20.0, 60.0, size=3)
        first = np.zeros_like(s, bool)
        first[:, 0] = True
        value, grad = v.vgrad(lambda x: jnp.sum(
            v.sparse_zlpr(x, np.zeros((3, 1), np.int32))))(jnp.asarray(confident))
        dense_value, dense_grad = v.dense_value_and_grad(confident, first, None)
        np.testing.assert_allclose(value, zlpr_ref(confident, first).sum(), rtol=1e-5)
        np.testing.assert_allclose(value, dense_value, rtol=1e-5)
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-7)
        # Rows with no entry selected: zero loss, finite zero gradient.
        value, grad = v.vgrad(lambda x: jnp.sum(
            v.sparse_zlpr(x, every, where=np.zeros(8, bool))))(jnp.asarray(s))
        assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
        # `[P]` indices broadcast over the batch; jit, vmap and bf16 logits.
        shared = np.array([2, 5, -1], np.int32)
        dense = np.zeros_like(s, bool)
        dense[:, [2, 5]] = True
        np.testing.assert_allclose(v.sparse_zlpr(s, shared), zlpr_ref(s, dense),
                                   rtol=1e-5)
        np.testing.assert_allclose(jax.vmap(sparse_zlpr, in_axes=(0, None))(s, shared),
                                   zlpr_ref(s, dense), rtol=1e-5)
        low = v.sparse_zlpr(jnp.asarray(s, jnp.bfloat16), shared)
        assert low.dtype == jnp.float32

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_pointer_kl(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
        t = (s + self.rng.normal(scale=0.5, size=s.shape)).astype(np.float32)
        got = v.gp_kl(s, t, axis=(-3, -2, -1))
        want = bernoulli_sym_kl_ref(s, t).reshape(3, -1).sum(-1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(v.gp_kl(t, s, axis=(1, 2, 3)), got, rtol=1e-6)
        assert np.all(np.asarray(v.gp_kl(s, t)) > 0)
        assert np.all(np.asarray(v.gp_kl(s, s)) == 0)
        # Masked spans (same large negative logit in both passes, or an explicit mask).
        neg = np.float32(_checks.large_negative(jnp.float32))
        lower = np.tril(np.ones((4, 4), bool), -1)
        s_gp, t_gp = np.where(lower, neg, s), np.where(lower, neg, t)
        value, grad = v.vgrad(lambda x: jnp.sum(v.gp_kl(x, t_gp)))(s_gp)
        want_gp = np.where(lower, 0.0, bernoulli_sym_kl_ref(s, t)).sum()
        np.testing.assert_allclose(value, want_gp, rtol=1e-5)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., lower] == 0)
        garbage = np.where(lower, np.float32(np.inf), s)
        value, grad = v.vgrad(
            lambda x: jnp.sum(v.gp_kl(x, t, where=~lower, axis=(-2, -1))))(garbage)
        np.testing.assert_allclose(value, want_gp, rtol=1e-5)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., lower] == 0)
        # Gradient is (σ(s) − σ(t)) + σ'(s)(s − t); bf16 input gives a float32 result.
        sig = 1 / (1 + np.exp(-s.astype(np.float64)))
        grad = v.grad_of(lambda x: jnp.sum(v.gp_kl(x, t)))(jnp.asarray(s))
        np.testing.assert_allclose(grad, sig - 1 / (1 + np.exp(-t.astype(np.float64)))
                                   + sig * (1 - sig) * (s - t), rtol=1e-4, atol=1e-6)
        assert v.gp_kl(jnp.asarray(s, jnp.bfloat16), t).dtype == jnp.float32

    @chex.variants(with_jit=True, without_jit=True)
    def test_softmax_kl(self):
        v = variant_ops(self.variant)
        s = self.rng.normal(size=(4, 9)).astype(np.float32)
        t = (s + self.rng.normal(size=s.shape)).astype(np.float32)
        got = v.sm_kl(s, t)
        np.testing.assert_allclose(got, softmax_sym_kl_ref(s, t), rtol=1e-5)
        np.testing.assert_allclose(v.sm_kl(t, s), got, rtol=1e-6)
        assert np.all(np.asarray(got) > 0)
        # Zero iff the distributions are equal: logits equal up to a per-row shift.
        np.testing.assert_allclose(v.sm_kl(s, s + np.float32(3.0)), 0.0, atol=1e-6)
        mask = self.rng.random(s.shape) < 0.7
        mask[0] = False
        garbage = np.where(mask, s, np.float32(np.nan))
        value, grad = v.vgrad(lambda x: jnp.sum(v.sm_kl(x, t, where=mask)))(garbage)
        np.testing.assert_allclose(v.sm_kl(garbage, t, where=mask),
                                   softmax_sym_kl_ref(s, t, mask), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(value, softmax_sym_kl_ref(s, t, mask).sum(), rtol=1e-5)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
        # Tuple axes: the softmax runs over the joint axes.
        s3, t3 = s.reshape(4, 3, 3), t.reshape(4, 3, 3)
        np.testing.assert_allclose(v.sm_kl(s3, t3, axis=(1, 2)),
                                   got, rtol=1e-5)
        np.testing.assert_allclose(jax.vmap(sm_kl)(s, t), got, rtol=1e-6)


def test_errors_name_the_argument():
    s = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"`logits` and `labels` must have the same shape"):
        zlpr(s, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"`logits` must be a floating-point array"):
        zlpr(s.astype(np.int32), s)
    with pytest.raises(ValueError, match=r"`where` with shape \(3,\) does not broadcast"):
        zlpr(s, s, where=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"`axis`=2 is out of range"):
        zlpr(s, s, axis=2)
    with pytest.raises(ValueError, match=r"`axis` must not repeat"):
        zlpr(s, s, axis=(1, -1))
    with pytest.raises(ValueError, match=r"`labels` must have a integer dtype"):
        sparse_zlpr(s, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"`labels.shape\[:-1\]` with shape \(3,\)"):
        sparse_zlpr(s, np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"`s` and `t` must have the same shape"):
        gp_kl(s, s[:, :4])
    with pytest.raises(ValueError, match=r"`t` must be a floating-point array"):
        sm_kl(s, s.astype(np.int32))
