"""Gaussian KL, Bhattacharyya and W2 distances against float64 NumPy/SciPy references."""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized

from kexue.ops.distances import bhattacharyya_distance, gaussian_kl, wasserstein2_distance
from tests.ops._variants import OpsTestCase

# Jitted, for the tests outside the jitted-and-eager variants.
kl = jax.jit(gaussian_kl)
bhattacharyya = jax.jit(bhattacharyya_distance)
w2 = jax.jit(wasserstein2_distance, static_argnames="squared")


def variant_ops(variant) -> SimpleNamespace:
    """The distances through a chex variant (`self.variant`: under `jax.jit`, or eagerly)."""
    return SimpleNamespace(kl=variant(gaussian_kl), bhattacharyya=variant(bhattacharyya_distance),
                           w2=variant(wasserstein2_distance, static_argnames="squared"))


def random_spd(rng, batch, d):
    a = rng.normal(size=(*batch, d, d))
    return a @ np.swapaxes(a, -1, -2) / d + 0.5 * np.eye(d)


def random_pair(rng, batch=(3,), d=3):
    mu1, mu2 = rng.normal(size=(*batch, d)), rng.normal(size=(*batch, d))
    return mu1, random_spd(rng, batch, d), mu2, random_spd(rng, batch, d)


def f32(*arrays):
    return tuple(np.asarray(a, np.float32) for a in arrays)


def kl_ref(mu1, cov1, mu2, cov2):
    inv2 = np.linalg.inv(cov2)
    delta = mu2 - mu1
    return 0.5 * (np.trace(inv2 @ cov1) + delta @ inv2 @ delta - len(mu1)
                  + np.log(np.linalg.det(cov2) / np.linalg.det(cov1)))


def bhattacharyya_ref(mu1, cov1, mu2, cov2):
    mid = (cov1 + cov2) / 2
    delta = mu1 - mu2
    return (delta @ np.linalg.inv(mid) @ delta / 8
            + 0.5 * np.log(np.linalg.det(mid) / np.sqrt(np.linalg.det(cov1) * np.linalg.det(cov2))))


def w2_sq_ref(mu1, cov1, mu2, cov2):
    root1 = scipy.linalg.sqrtm(cov1)
    cross = scipy.linalg.sqrtm(root1 @ cov2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * np.real(cross))


def batched_ref(ref, *arrays):
    return np.array([ref(*(a[b] for a in arrays)) for b in range(arrays[0].shape[0])])


class TestDistancesJittedAndEager(OpsTestCase):
    """Each reference and property check runs under `jax.jit` and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("kl", "bhattacharyya", "w2_squared")
    def test_matches_reference(self, name):
        fx = variant_ops(self.variant)
        fn, ref = {"kl": (fx.kl, kl_ref), "bhattacharyya": (fx.bhattacharyya, bhattacharyya_ref),
                   "w2_squared": (lambda *a: fx.w2(*a, squared=True), w2_sq_ref)}[name]
        args = random_pair(self.rng)
        got = fn(*f32(*args))
        assert got.shape == (3,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, batched_ref(ref, *args), rtol=1e-4, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_float64_is_kept_and_exact(self):
        fx = variant_ops(self.variant)
        args = random_pair(self.rng, batch=(2,), d=4)
        with jax.enable_x64(True):
            got_kl = fx.kl(*args)
            got_b = fx.bhattacharyya(*args)
            got_w = fx.w2(*args, squared=True)
            assert got_kl.dtype == got_b.dtype == got_w.dtype == jnp.float64
            np.testing.assert_allclose(got_kl, batched_ref(kl_ref, *args), rtol=1e-10)
            np.testing.assert_allclose(got_b, batched_ref(bhattacharyya_ref, *args), rtol=1e-10)
            np.testing.assert_allclose(got_w, batched_ref(w2_sq_ref, *args), rtol=1e-8)
            # W2 = |μ1 − μ2| when the covariances are equal (no cancellation left in float64).
            same = fx.w2(args[0], args[1], args[2], args[1])
            np.testing.assert_allclose(same, np.linalg.norm(args[0] - args[2], axis=-1), rtol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_divergences_are_zero_iff_equal_and_positive_otherwise(self):
        fx = variant_ops(self.variant)
        mu1, cov1, mu2, cov2 = f32(*random_pair(self.rng))
        for fn in (kl, bhattacharyya, w2):
            assert np.all(np.asarray(fn(mu1, cov1, mu2, cov2)) > 1e-3)
            assert np.all(np.asarray(fn(mu1, cov1, mu1, cov2)) > 1e-4)  # same mean only
            assert np.all(np.asarray(fn(mu1, cov1, mu2, cov1)) > 1e-4)  # same covariance only
        np.testing.assert_allclose(fx.kl(mu1, cov1, mu1, cov1), 0.0, atol=1e-5)
        np.testing.assert_allclose(fx.bhattacharyya(mu1, cov1, mu1, cov1), 0.0, atol=1e-5)
        # W2² cancels tr Σ1 + tr Σ2 against 2 tr(…)^½, so float32 leaves ~1e-6 · tr Σ.
        np.testing.assert_allclose(fx.w2(mu1, cov1, mu1, cov1, squared=True), 0.0, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_symmetry(self):
        fx = variant_ops(self.variant)
        mu1, cov1, mu2, cov2 = f32(*random_pair(self.rng))
        np.testing.assert_allclose(fx.bhattacharyya(mu1, cov1, mu2, cov2),
                                   fx.bhattacharyya(mu2, cov2, mu1, cov1), rtol=1e-5)
        np.testing.assert_allclose(fx.w2(mu1, cov1, mu2, cov2), fx.w2(mu2, cov2, mu1, cov1),
                                   rtol=1e-4)
        # KL is not symmetric.
        assert not np.allclose(fx.kl(mu1, cov1, mu2, cov2), fx.kl(mu2, cov2, mu1, cov1), rtol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_w2_closed_forms(self):
        fx = variant_ops(self.variant)
        d = 4
        basis, _ = np.linalg.qr(self.rng.normal(size=(d, d)))
        a, b = self.rng.uniform(0.2, 3.0, size=d), self.rng.uniform(0.2, 3.0, size=d)
        cov1, cov2 = basis @ np.diag(a) @ basis.T, basis @ np.diag(b) @ basis.T  # commuting
        mu1, mu2 = self.rng.normal(size=d), self.rng.normal(size=d)
        want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
        np.testing.assert_allclose(fx.w2(*f32(mu1, cov1, mu2, cov2), squared=True), want, rtol=1e-4)
        np.testing.assert_allclose(fx.w2(*f32(mu1, cov1, mu2, cov2)), np.sqrt(want), rtol=1e-4)
        # Equal covariances: only the means differ.
        np.testing.assert_allclose(fx.w2(*f32(mu1, cov1, mu2, cov1)), np.linalg.norm(mu1 - mu2),
                                   rtol=1e-4, atol=1e-3)
        # One dimension: W2² = (m1 − m2)² + (σ1 − σ2)².
        got = fx.w2(*f32([0.5], [[4.0]], [-1.0], [[0.25]]), squared=True)
        np.testing.assert_allclose(got, 1.5**2 + 1.5**2, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients(self):
        mu1, cov1, mu2, cov2 = f32(*random_pair(self.rng, batch=(2,)))
        # ∂KL/∂μ1 = Σ2⁻¹(μ1 − μ2);  ∂W2²/∂μ1 = 2(μ1 − μ2).
        grad_kl = self.variant(jax.grad(
            lambda m: jnp.sum(gaussian_kl(m, cov1, mu2, cov2))))(mu1)
        want = np.einsum("bij,bj->bi", np.linalg.inv(cov2.astype(np.float64)), mu1 - mu2)
        np.testing.assert_allclose(grad_kl, want, rtol=1e-4, atol=1e-5)
        grad_w = self.variant(jax.grad(lambda m: jnp.sum(wasserstein2_distance(
            m, cov1, mu2, cov2, squared=True))))(mu1)
        np.testing.assert_allclose(grad_w, 2 * (mu1 - mu2), rtol=1e-4, atol=1e-5)
        # Finite gradients at coincident distributions (W2 not squared has a kink there).
        all_grads = self.variant(jax.grad(lambda *a: jnp.sum(wasserstein2_distance(*a))
                                          + jnp.sum(bhattacharyya_distance(*a))
                                          + jnp.sum(gaussian_kl(*a)), argnums=(0, 1, 2, 3)))
        for grads in (all_grads(mu1, cov1, mu1, cov1), all_grads(mu1, cov1, mu2, cov2)):
            assert all(np.all(np.isfinite(g)) for g in grads)


def test_broadcasting_and_vmap(rng):
    mu1, cov1, mu2, cov2 = f32(*random_pair(rng, batch=(2, 3)))
    # One reference distribution against a [2, 3] batch.
    got = kl(mu1, cov1, mu2[0, 0], cov2[0, 0])
    assert got.shape == (2, 3)
    want = np.array([[kl_ref(mu1[i, j].astype(np.float64), cov1[i, j].astype(np.float64),
                             mu2[0, 0].astype(np.float64), cov2[0, 0].astype(np.float64))
                      for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    vmapped = jax.vmap(jax.vmap(wasserstein2_distance))(mu1, cov1, mu2, cov2)
    np.testing.assert_allclose(vmapped, w2(mu1, cov1, mu2, cov2), rtol=1e-5)


def test_bfloat16_inputs(rng):
    args = random_pair(rng)
    low = tuple(jnp.asarray(a, jnp.bfloat16) for a in args)
    rounded = tuple(np.asarray(a.astype(jnp.float32), np.float64) for a in low)
    for fn, ref in ((kl, kl_ref), (bhattacharyya, bhattacharyya_ref)):
        got = fn(*low)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, batched_ref(ref, *rounded), rtol=1e-3, atol=1e-4)


def test_errors_name_the_argument():
    mu, cov = np.zeros((2, 3), np.float32), np.tile(np.eye(3, dtype=np.float32), (2, 1, 1))
    with pytest.raises(ValueError, match=r"`cov2` must have shape \[..., d, d\] with d=3"):
        gaussian_kl(mu, cov, mu, cov[..., :2, :2])
    with pytest.raises(ValueError, match=r"`mu2` must have size 3 on axis -1"):
        bhattacharyya_distance(mu, cov, mu[:, :2], cov)
    with pytest.raises(ValueError, match=r"`mu1` with shape \(2,\) does not broadcast"):
        wasserstein2_distance(mu, np.tile(cov[:1], (4, 1, 1)), mu, cov)
    with pytest.raises(ValueError, match=r"`cov1` must be a floating-point array"):
        gaussian_kl(mu, cov.astype(np.int32), mu, cov)
    with pytest.raises(ValueError, match=r"`mu1` must have at least 1 axes"):
        gaussian_kl(np.float32(0.0), cov, mu, cov)
