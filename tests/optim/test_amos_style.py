"""Amos-style pieces (kexue.fm/archives/9344): normalised updates, decoupled decay, the chain."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kexue import optim


def _random_tree(rng, scale=1.0):
    return {
        "kernel": jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32),
        "scalar": jnp.asarray(rng.normal() * scale, jnp.float32),
        "conv": jnp.asarray(rng.normal(size=(3, 2, 4)) * scale, jnp.float32),
    }


SIGMA = {"kernel": 0.2, "bias": 0.5, "scalar": 0.5, "conv": 0.05}


def _sigma_fn(path, shape):
    return SIGMA[path]


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e25])
def test_normalised_updates_have_norm_sqrt_k_sigma_and_keep_direction(rng, scale):
    updates = _random_tree(rng, scale)
    tx = optim.normalize_updates(_sigma_fn)
    out, _ = jax.jit(tx.update)(updates, tx.init(updates))
    for name, u in updates.items():
        u64, o64 = np.asarray(u, np.float64), np.asarray(out[name], np.float64)
        k = u64.size
        assert np.linalg.norm(o64) == pytest.approx(math.sqrt(k) * SIGMA[name], rel=1e-5)
        # Same direction: o = c u with c > 0.
        c = np.linalg.norm(o64) / np.linalg.norm(u64)
        np.testing.assert_allclose(o64, c * u64, rtol=1e-5, atol=1e-30)


def test_normalising_zero_and_bfloat16_updates():
    tx = optim.normalize_updates(lambda path, shape: 0.5)
    zeros = {"w": jnp.zeros((4, 3))}
    out, _ = tx.update(zeros, tx.init(zeros))
    assert np.all(np.asarray(out["w"]) == 0)
    half = {"w": jnp.arange(1.0, 13.0).reshape(4, 3).astype(jnp.bfloat16)}
    out, _ = tx.update(half, tx.init(half))
    assert out["w"].dtype == jnp.bfloat16
    norm = np.linalg.norm(np.asarray(out["w"], np.float64))
    assert norm == pytest.approx(math.sqrt(12) * 0.5, rel=1e-2)  # bfloat16 has 8 bits


def numpy_amos_style_sign(theta, grads, *, alpha0, sigma, q, half_life, kind, warmup):
    """θ ← θ − (α_t u_t + ρ_t θ) with u_t = √k σ sign(g)/‖sign(g)‖, in float64 (archive 9344)."""
    theta = {k: np.array(v, np.float64) for k, v in theta.items()}
    rate = (math.sqrt(2) - 1) / half_life if kind == "inverse_square" else 1 / half_life
    for t, g in enumerate(grads):
        decay = 1 / (1 + rate * t) ** (2 if kind == "inverse_square" else 1)
        decay *= min(1.0, t / warmup) if warmup else 1.0
        alpha_t, rho_t = alpha0 * decay, alpha0 ** 2 / (2 * q) * decay
        for name in theta:
            s = np.sign(np.asarray(g[name], np.float64))
            u = math.sqrt(s.size) * sigma[name] * s / np.linalg.norm(s)
            theta[name] = theta[name] - (alpha_t * u + rho_t * theta[name])
    return theta


@pytest.mark.parametrize("kind, warmup", [("inverse_square", 0), ("inverse_time", 3)])
def test_sign_chain_matches_the_formula_step_by_step(rng, kind, warmup):
    params = _random_tree(rng)
    grads = [_random_tree(rng) for _ in range(6)]
    alpha0, q, half_life = 0.3, 0.7, 4
    tx = optim.amos_style(alpha0, direction="sign", sigma_fn=_sigma_fn, half_life=half_life,
                          kind=kind, q=q, warmup_steps=warmup)
    p, state = params, tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        u, state = step(g, state, p)
        p = optax.apply_updates(p, u)
    expected = numpy_amos_style_sign(params, grads, alpha0=alpha0, sigma=SIGMA, q=q,
                                     half_life=half_life, kind=kind, warmup=warmup)
    for name in params:
        np.testing.assert_allclose(np.asarray(p[name]), expected[name], rtol=2e-5, atol=1e-6)


def test_weight_decay_alone_shrinks_by_rho_t(rng):
    """With a zero direction only `−ρ_t θ` is left: θ_{t+1} = (1 − α₀²/(2q) decay(t)) θ_t."""
    params = _random_tree(rng)
    alpha0, q, half_life = 0.5, 2.0, 3
    tx = optim.amos_style(alpha0, direction="adam", sigma_fn=_sigma_fn, half_life=half_life, q=q)
    decay = optim.amos_decay_schedule("inverse_square", half_life=half_life)
    zero = jax.tree.map(jnp.zeros_like, params)
    p, state = params, tx.init(params)
    for t in range(4):
        u, state = tx.update(zero, state, p)
        expected = jax.tree.map(lambda x, t=t: x * (1 - alpha0**2 / (2 * q) * decay(t)), p)
        p = optax.apply_updates(p, u)
        chex.assert_trees_all_close(p, expected, rtol=1e-6)


def test_weight_decay_mask_and_constant_rate(rng):
    params = _random_tree(rng)
    mask = {k: k == "kernel" for k in params}
    tx = optim.decoupled_weight_decay(0.1, mask=mask)
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["kernel"], -0.1 * params["kernel"], rtol=1e-6)
    assert np.all(np.asarray(u["bias"]) == 0)


def test_amos_style_works_in_multisteps_and_apply_if_finite(rng):
    """A NaN gradient between two accumulations is skipped; the rest is plain MultiSteps."""
    params = _random_tree(rng)

    def multisteps():
        return optax.MultiSteps(
            optim.amos_style(0.1, direction="factored", sigma_fn=_sigma_fn, half_life=10),
            every_k_schedule=2)

    guarded = optax.apply_if_finite(multisteps(), max_consecutive_errors=2)
    plain = multisteps()
    finite = [_random_tree(rng) for _ in range(4)]
    bad = dict(finite[0], kernel=finite[0]["kernel"].at[2, 3].set(jnp.nan),
               scalar=jnp.asarray(jnp.inf, jnp.float32))
    p1, s1 = params, guarded.init(params)
    for grads in (finite[0], finite[1], bad, finite[2], finite[3]):
        u, s1 = jax.jit(guarded.update)(grads, s1, p1)
        p1 = optax.apply_updates(p1, u)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p1))
    p2, s2 = params, plain.init(params)
    for grads in finite:
        u, s2 = jax.jit(plain.update)(grads, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert int(s1.total_notfinite) == 1 and int(s1.notfinite_count) == 0
    assert int(s1.inner_state.gradient_step) == int(s2.gradient_step) == 2
    # The guarded steps run under a `where`: compare at float32 resolution.
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
    moved = {k: float(jnp.linalg.norm(p1[k] - params[k])) for k in p1}
    assert all(value > 0 for value in moved.values()), moved


def test_errors():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="`direction` must be one of"):
        optim.amos_style(0.1, direction="lion", sigma_fn=_sigma_fn, half_life=10)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate"):
            optim.amos_style(bad, sigma_fn=_sigma_fn, half_life=10)
    with pytest.raises(ValueError, match="q"):
        optim.amos_style(0.1, sigma_fn=_sigma_fn, half_life=10, q=0)
    with pytest.raises(ValueError, match="half_life"):
        optim.amos_style(0.1, sigma_fn=_sigma_fn, half_life=0)
    with pytest.raises(ValueError, match="rate"):
        optim.decoupled_weight_decay(-0.1)
    only_kernels = optim.eta_fn_from_rules([("kernel$", 0.1)])
    tx = optim.amos_style(0.1, sigma_fn=only_kernels, half_life=10)
    with pytest.raises(ValueError, match=r"'dense/bias'"):
        tx.init(params)
    zero_sigma = optim.amos_style(0.1, sigma_fn=lambda path, shape: 0.0, half_life=10)
    with pytest.raises(ValueError, match=r"sigma for parameter 'dense/bias'"):
        zero_sigma.init(params)
