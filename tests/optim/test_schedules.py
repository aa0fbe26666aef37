"""The Amos-style decay laws (kexue.fm/archives/9344) against their closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue import optim


def closed_form(kind, t, half_life):
    t = np.asarray(t, np.float64)
    if kind == "inverse_square":
        alpha0_p = (math.sqrt(2) - 1) / half_life  # α₀p giving half-life T
        return 1.0 / (alpha0_p * t + 1.0) ** 2
    two_alpha0_p0 = 1.0 / half_life  # 2α₀p₀ giving half-life T
    return 1.0 / (two_alpha0_p0 * t + 1.0)


@pytest.mark.parametrize("kind", ["inverse_square", "inverse_time"])
def test_matches_closed_form_and_halves_after_half_life(rng, kind):
    half_life = int(rng.integers(5, 5000))
    init_value = float(rng.uniform(0.01, 2.0))
    schedule = optim.amos_decay_schedule(kind, half_life=half_life, init_value=init_value)
    steps = np.concatenate([[0, 1, half_life, 2 * half_life], rng.integers(0, 20 * half_life, 20)])
    values = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))
    np.testing.assert_allclose(values, init_value * closed_form(kind, steps, half_life), rtol=1e-6)
    with jax.enable_x64(True):
        assert float(schedule(half_life)) == pytest.approx(init_value / 2, rel=1e-14)
        # Halving again takes longer for these laws; inverse-time: 1/3 after 2T.
        if kind == "inverse_time":
            assert float(schedule(2 * half_life)) == pytest.approx(init_value / 3, rel=1e-14)
        else:
            assert float(schedule(2 * half_life)) == pytest.approx(
                init_value / (2 * math.sqrt(2) - 1) ** 2, rel=1e-14)


@pytest.mark.parametrize("kind", ["inverse_square", "inverse_time"])
def test_warmup_ramps_linearly_then_leaves_the_decay(rng, kind):
    half_life, warmup = int(rng.integers(50, 500)), int(rng.integers(2, 40))
    plain = optim.amos_decay_schedule(kind, half_life=half_life, init_value=0.3)
    warmed = optim.amos_decay_schedule(kind, half_life=half_life, warmup_steps=warmup,
                                       init_value=0.3)
    steps = np.arange(0, 3 * warmup)
    expected = np.minimum(1.0, steps / warmup) * 0.3 * closed_form(kind, steps, half_life)
    np.testing.assert_allclose(np.asarray(jax.vmap(warmed)(jnp.asarray(steps))), expected,
                               rtol=1e-6, atol=1e-12)
    assert float(warmed(0)) == 0.0
    assert float(warmed(warmup + 7)) == pytest.approx(float(plain(warmup + 7)), rel=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "cosine", "half_life": 10}, "kind"),
    ({"half_life": 0}, "half_life"),
    ({"half_life": -3.0}, "half_life"),
    ({"half_life": 10, "warmup_steps": -1}, "warmup_steps"),
    ({"half_life": 10, "warmup_steps": 2.5}, "warmup_steps"),
    ({"half_life": 10, "init_value": float("inf")}, "init_value"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.amos_decay_schedule(**kwargs)
