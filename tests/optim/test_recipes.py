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


def _rate_reference(name: str, settings: dict, num_steps: int, count: int) -> float:
    """float64 NumPy: the global rate of the `count`-th update (0-based), from the formulas."""
    lr = settings["learning_rate"]
    if name == "adamw":
        warmup = settings["warmup_steps"]
        if count < warmup:
            return lr * count / warmup
        return 0.5 * lr * (1 + np.cos(np.pi * min(count - warmup, num_steps - warmup)
                                      / (num_steps - warmup)))
    if name == "amos_style":  # α₀ / (1 + (√2 − 1) t / T)² · min(1, t / warmup)
        decay = 1 / (1 + (np.sqrt(2) - 1) * count / settings["half_life"]) ** 2
        return lr * decay * min(1.0, count / settings["warmup_steps"])
    return lr  # Amos: the global rate ξ


@pytest.mark.parametrize("name", ["adamw", "amos", "amos_factored", "amos_style"])
def test_learning_rate_schedule_follows_the_recipe_formula(rng, name):
    num_steps = int(rng.integers(50, 400))
    settings = {"learning_rate": float(rng.uniform(1e-3, 0.2))}
    if name == "adamw":
        settings.update(warmup_steps=int(rng.integers(1, 40)), schedule="cosine")
    if name == "amos_style":
        settings.update(half_life=int(rng.integers(10, 500)), warmup_steps=int(rng.integers(1, 20)))
    schedule = optim.learning_rate_schedule(name, settings, num_steps=num_steps)
    for count in (0, 1, int(rng.integers(2, num_steps)), num_steps - 1):
        # float32 schedule: near the end of the cosine the rate is ~1e-4 of the peak, so
        # the absolute tolerance is set by float32's precision at the peak rate.
        np.testing.assert_allclose(float(schedule(count)),
                                   _rate_reference(name, settings, num_steps, count),
                                   rtol=1e-5, atol=1e-7 * settings["learning_rate"])


def test_learning_rate_schedule_is_the_rate_adamw_applies(rng):
    """AdamW with b1 = 0 and no decay moves by `−η_t g / (√v̂_t + ε)` (NumPy float64 Adam
    below): the rate read off each update is the schedule's."""
    b2, eps = 0.98, 1e-8
    settings = {"learning_rate": 0.05, "warmup_steps": 3, "b1": 0.0, "b2": b2,
                "weight_decay": 0.0, "eps": eps}
    tx = optim.make_optimizer("adamw", settings, num_steps=12)
    rate = optim.learning_rate_schedule("adamw", settings, num_steps=12)
    params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    state, v = tx.init(params), np.zeros(5)
    for count in range(12):
        g = rng.normal(size=5)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        v = b2 * v + (1 - b2) * g ** 2
        direction = g / (np.sqrt(v / (1 - b2 ** (count + 1))) + eps)
        np.testing.assert_allclose(-np.asarray(updates["w"], np.float64),
                                   float(rate(count)) * direction, rtol=1e-4, atol=1e-8)


def test_learning_rate_schedule_rejects_unknown_settings():
    with pytest.raises(ValueError, match=re.escape("unknown ['beta']")):
        optim.learning_rate_schedule("adamw", {"beta": 0.9}, num_steps=10)
