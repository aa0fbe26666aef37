"""Real learning: a tanh MLP fitted to a nonlinear teacher with Amos and Amos-style chains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kexue import optim

STEPS, BATCH, BATCHES = 400, 64, 8


def _teacher_problem(rng):
    n, d, hidden = BATCH * BATCHES, 8, 32
    x = rng.normal(size=(n, d)).astype(np.float32)
    teacher_in = rng.normal(size=(d, 16)) / np.sqrt(d)
    teacher_out = rng.normal(size=(16, 1)) / 4
    y = (np.tanh(2 * x @ teacher_in) @ teacher_out).astype(np.float32)
    key_hidden, key_out = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
    params = {
        "hidden": {"kernel": jax.random.normal(key_hidden, (d, hidden)) / np.sqrt(d),
                   "bias": jnp.zeros(hidden)},
        "out": {"kernel": jax.random.normal(key_out, (hidden, 1)) / np.sqrt(hidden),
                "bias": jnp.zeros(1)},
    }
    # Best affine fit, by least squares: what a model that never used its hidden
    # nonlinearity could at most reach.
    design = np.concatenate([x, np.ones((n, 1), np.float32)], axis=1).astype(np.float64)
    coef = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]
    linear_mse = float(np.mean((design @ coef - y) ** 2))
    return jnp.asarray(x), jnp.asarray(y), params, linear_mse


def _loss(params, x, y):
    hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean((hidden @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def _train(tx, params, x, y):
    @jax.jit
    def run(params):
        def body(carry, step):
            params, state = carry
            start = (step % BATCHES) * BATCH
            xb = jax.lax.dynamic_slice_in_dim(x, start, BATCH)
            yb = jax.lax.dynamic_slice_in_dim(y, start, BATCH)
            updates, state = tx.update(jax.grad(_loss)(params, xb, yb), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(STEPS))
        return params

    return float(_loss(run(params), x, y))


OPTIMIZERS = {
    "amos": lambda eta: optim.amos(0.05, eta),
    "amos_factored": lambda eta: optim.amos(0.05, eta, optim.reduce_largest_axes()),
    "amos_style_adam": lambda eta: optim.amos_style(0.03, direction="adam", sigma_fn=eta,
                                                    half_life=300),
    "amos_style_factored": lambda eta: optim.amos_style(0.03, direction="factored",
                                                        sigma_fn=eta, half_life=300),
    "amos_style_sign": lambda eta: optim.amos_style(0.03, direction="sign", sigma_fn=eta,
                                                    half_life=300),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fits_a_nonlinear_teacher_better_than_any_linear_model(rng, name):
    x, y, params, linear_mse = _teacher_problem(rng)
    tx = OPTIMIZERS[name](optim.eta_fn_from_init(params))
    final = _train(tx, params, x, y)
    initial = float(_loss(params, x, y))
    # Threshold: the best affine model (least squares) leaves `linear_mse`; a model
    # that did not learn the nonlinear part of the teacher cannot go below it. Over
    # 30 seeds these settings ended at a median 0.04-0.15 of it and at worst 0.30
    # (sign, the noisiest direction), and at worst 0.08 of the initial loss (which is
    # 3-30x `linear_mse`); a later run met a seed where Amos ended at 0.60 of it. 0.8 of
    # the linear error (still below every affine model) and an 85% reduction leave room
    # for such seeds while still demanding real nonlinear fitting.
    assert final < 0.8 * linear_mse, (name, initial, final, linear_mse)
    assert final < 0.15 * initial, (name, initial, final)
