"""Closed-form distances between multivariate normal distributions (kexue.fm/archives/8512).

For `p = N(μ_p, Σ_p)` and `q = N(μ_q, Σ_q)` in `k` dimensions:

* KL divergence `KL(p‖q)`,
* Bhattacharyya distance `−log ∫ √(p q)`,
* 2-Wasserstein distance `W2(p, q)`.

All three are batched over leading axes (which broadcast against each other), built on
Cholesky factors (plus one symmetric eigendecomposition for W2) instead of explicit
inverses or general matrix square roots, and computed in at least float32 (float64
inputs under `jax_enable_x64` stay float64). Covariances must be symmetric positive
definite; this is not checked (it would need the values), and a non-SPD input gives NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from kexue.ops import _checks

__all__ = ["bhattacharyya_distance", "gaussian_kl", "wasserstein2_distance"]


def _prepare(mu1, cov1, mu2, cov2) -> tuple[jax.Array, ...]:
    """Check shapes/dtypes; broadcast to a common batch shape in the compute dtype."""
    for name, x in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        _checks.check_floating(name, x)
    _checks.check_min_rank("mu1", mu1, 1, "[..., d]")
    _checks.check_min_rank("mu2", mu2, 1, "[..., d]")
    _checks.check_min_rank("cov1", cov1, 2, "[..., d, d]")
    _checks.check_min_rank("cov2", cov2, 2, "[..., d, d]")
    d = _checks.shape_of(mu1)[-1]
    _checks.check_dim("mu2", mu2, -1, d, "d, as in mu1")
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        shape = _checks.shape_of(cov)
        if shape[-2:] != (d, d):
            raise ValueError(
                f"`{name}` must have shape [..., d, d] with d={d} (from mu1); got shape {shape}."
            )
    batch = _checks.check_broadcastable("mu1", _checks.shape_of(mu1)[:-1],
                                        "cov1", _checks.shape_of(cov1)[:-2])
    batch = _checks.check_broadcastable("mu1/cov1 batch", batch,
                                        "mu2", _checks.shape_of(mu2)[:-1])
    batch = _checks.check_broadcastable("mu1/cov1/mu2 batch", batch,
                                        "cov2", _checks.shape_of(cov2)[:-2])
    dtype = _checks.compute_dtype(jnp.result_type(mu1, cov1, mu2, cov2))
    mu1, mu2 = (jnp.broadcast_to(jnp.asarray(m).astype(dtype), (*batch, d)) for m in (mu1, mu2))
    cov1, cov2 = (jnp.broadcast_to(jnp.asarray(c).astype(dtype), (*batch, d, d))
                  for c in (cov1, cov2))
    return mu1, cov1, mu2, cov2


def _log_det_from_cholesky(chol: jax.Array) -> jax.Array:
    """`log det Σ = 2 Σ_i log L_ii` for `Σ = L Lᵀ`."""
    return 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def _mahalanobis_sq(chol: jax.Array, delta: jax.Array) -> jax.Array:
    """`δᵀ Σ⁻¹ δ = ‖L⁻¹ δ‖²` for `Σ = L Lᵀ`."""
    z = solve_triangular(chol, delta[..., None], lower=True)[..., 0]
    return jnp.sum(z * z, axis=-1)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """`√max(x, 0)` with gradient 0 (not ∞/NaN) where `x ≤ 0`."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def gaussian_kl(mu1, cov1, mu2, cov2) -> jax.Array:
    """`KL(N(μ₁, Σ₁) ‖ N(μ₂, Σ₂))`, batched (kexue.fm/archives/8512).

    `½ [tr(Σ₂⁻¹Σ₁) + (μ₂−μ₁)ᵀ Σ₂⁻¹ (μ₂−μ₁) − k + log det Σ₂ − log det Σ₁]`, with
    `tr(Σ₂⁻¹Σ₁) = ‖L₂⁻¹ L₁‖²_F` from the Cholesky factors `Σ = L Lᵀ`.

    Args:
      mu1: `[..., d]` mean of `p`.
      cov1: `[..., d, d]` SPD covariance of `p`.
      mu2: `[..., d]` mean of `q`.
      cov2: `[..., d, d]` SPD covariance of `q`. Leading axes of all four broadcast.

    Returns:
      `[...]` divergence (not symmetric), float32 (float64 for float64 inputs).
    """
    mu1, cov1, mu2, cov2 = _prepare(mu1, cov1, mu2, cov2)
    l1, l2 = jnp.linalg.cholesky(cov1), jnp.linalg.cholesky(cov2)
    whitened = solve_triangular(l2, l1, lower=True)
    trace = jnp.sum(whitened * whitened, axis=(-2, -1))
    maha = _mahalanobis_sq(l2, mu2 - mu1)
    d = mu1.shape[-1]
    return 0.5 * (trace + maha - d + _log_det_from_cholesky(l2) - _log_det_from_cholesky(l1))


def bhattacharyya_distance(mu1, cov1, mu2, cov2) -> jax.Array:
    """Bhattacharyya distance between two normals, batched (kexue.fm/archives/8512).

    `⅛ Δμᵀ Σ⁻¹ Δμ + ½ log(det Σ / √(det Σ₁ det Σ₂))` with `Σ = (Σ₁ + Σ₂)/2`; symmetric,
    non-negative, zero iff the distributions are equal.

    Args:
      mu1: `[..., d]` mean of `p`.
      cov1: `[..., d, d]` SPD covariance of `p`.
      mu2: `[..., d]` mean of `q`.
      cov2: `[..., d, d]` SPD covariance of `q`. Leading axes of all four broadcast.

    Returns:
      `[...]` distance, float32 (float64 for float64 inputs).
    """
    mu1, cov1, mu2, cov2 = _prepare(mu1, cov1, mu2, cov2)
    l_mid = jnp.linalg.cholesky((cov1 + cov2) / 2)
    log_det_1 = _log_det_from_cholesky(jnp.linalg.cholesky(cov1))
    log_det_2 = _log_det_from_cholesky(jnp.linalg.cholesky(cov2))
    maha = _mahalanobis_sq(l_mid, mu2 - mu1)
    return maha / 8 + 0.5 * (_log_det_from_cholesky(l_mid) - 0.5 * (log_det_1 + log_det_2))


def wasserstein2_distance(mu1, cov1, mu2, cov2, *, squared: bool = False) -> jax.Array:
    """2-Wasserstein distance between two normals, batched (kexue.fm/archives/8512).

    `W2² = ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½})`. The trace of the matrix
    square root is `Σ_i √λ_i` over the eigenvalues of `L₂ᵀ Σ₁ L₂` (`Σ₂ = L₂ L₂ᵀ`), which
    are those of `Σ₁ Σ₂` and of `Σ₁^{½} Σ₂ Σ₁^{½}`: one Cholesky and one `eigvalsh`.

    Args:
      mu1: `[..., d]` mean of `p`.
      cov1: `[..., d, d]` SPD covariance of `p`.
      mu2: `[..., d]` mean of `q`.
      cov2: `[..., d, d]` SPD covariance of `q`. Leading axes of all four broadcast.
      squared: return `W2²` instead of `W2`.

    Returns:
      `[...]` distance, float32 (float64 for float64 inputs). Rounding below 0 is
      clipped to 0; the gradient of `W2` (not squared) at 0 is 0, not NaN.
    """
    mu1, cov1, mu2, cov2 = _prepare(mu1, cov1, mu2, cov2)
    l2 = jnp.linalg.cholesky(cov2)
    inner = jnp.swapaxes(l2, -1, -2) @ cov1 @ l2
    inner = (inner + jnp.swapaxes(inner, -1, -2)) / 2
    trace_sqrt = jnp.sum(_safe_sqrt(jnp.linalg.eigvalsh(inner)), axis=-1)
    delta = mu1 - mu2
    trace = jnp.trace(cov1, axis1=-2, axis2=-1) + jnp.trace(cov2, axis1=-2, axis2=-1)
    w2_sq = jnp.maximum(jnp.sum(delta * delta, axis=-1) + trace - 2 * trace_sqrt, 0)
    return w2_sq if squared else _safe_sqrt(w2_sq)
