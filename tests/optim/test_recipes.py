"""`make_optimizer`: each named optimizer equals its chain built by hand, step by step;
defaults are read off the recipes; bad names, settings and clip norms are rejected."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kexue import optim


def _params(rng):
    return {"dense": {"kernel": jnp.asarray(rng.normal(0, 0.1, (6, 4)), jnp.float32),
                      "bias": jnp.zeros(4, jnp.float32)},
            "scale": jnp.ones(3, jnp.float32)}


def _run(tx, params, grads_list):
    state = tx.init(params)
    out = []
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def _by_hand(name, params, num_steps):
    eta = optim.eta_fn_from_init(params)
    if name == "adamw":
        rate = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, num_steps)
        return optax.adamw(rate, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01)
    if name in ("amos", "amos_factored"):
        shape_fn = optim.reduce_largest_axes() if name == "amos_factored" else None
        return optim.amos(0.05, eta, shape_fn, beta=0.98, zeta=0.25, momentum=0.9)
    return optim.amos_style(0.01, direction="adam", sigma_fn=eta, half_life=1000,
                            kind="inverse_square", q=1.0, warmup_steps=0,
                            direction_kwargs={"b1": 0.9, "b2": 0.98})


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_default_recipe_equals_the_chain_built_by_hand(name, rng):
    params = _params(rng)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
             for _ in range(5)]
    got = _run(optim.make_optimizer(name, num_steps=200, initial_params=params), params, grads)
    want = _run(_by_hand(name, params, 200), params, grads)
    chex.assert_trees_all_equal(got, want)


def test_clip_norm_clips_before_the_optimizer(rng):
    params = _params(rng)
    grads = [jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)]
    got = _run(optim.make_optimizer("adamw", {"schedule": "constant", "warmup_steps": 0},
                                    num_steps=10, clip_norm=1.0), params, grads)
    want = _run(optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(optax.constant_schedule(1e-3), b1=0.9, b2=0.98,
                                        eps=1e-8, weight_decay=0.01)), params, grads)
    chex.assert_trees_all_equal(got, want)


def test_defaults_are_the_recipe_signatures():
    assert optim.optimizer_defaults("adamw") == {
        "learning_rate": 1e-3, "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 0.01,
        "warmup_steps": 50, "schedule": "cosine"}
    assert optim.optimizer_defaults("amos") == optim.optimizer_defaults("amos_factored") == {
        "learning_rate": 0.05, "beta": 0.98, "zeta": 0.25, "momentum": 0.9}
    assert set(optim.optimizer_defaults("amos_style")) == {
        "learning_rate", "direction", "half_life", "kind", "q", "warmup_steps", "b1", "b2"}


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "sgd"}, "`name`: expected one of"),
    ({"name": "adamw", "settings": {"beta": 0.9}}, "unknown ['beta']"),
    ({"name": "amos"}, "`initial_params`"),
    ({"name": "adamw", "clip_norm": float("nan")}, "`clip_norm`: expected a finite number"),
    ({"name": "adamw", "clip_norm": -1.0}, "`clip_norm`: expected a finite number >= 0"),
    ({"name": "adamw", "settings": {"schedule": "linear"}}, "`schedule`: expected one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        optim.make_optimizer(**{"num_steps": 10, **kwargs})


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_without_warmup_the_first_step_takes_the_full_rate(schedule, rng):
    params = _params(rng)
    grads = [jax.tree.map(lambda p: jnp.ones_like(p), params)]
    tx = optim.make_optimizer("adamw", {"schedule": schedule, "warmup_steps": 0,
                                        "weight_decay": 0.0}, num_steps=100)
    (after,) = _run(tx, params, grads)
    # Adam's first step moves every entry by the rate (m̂ / √v̂ = 1 for a constant gradient).
    for new, old in zip(jax.tree.leaves(after), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(old - new), 1e-3, rtol=1e-4)
