"""Amos: against a float64 NumPy re-implementation, in Optax wrappers, on NNX state and meshes."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kexue import optim

# ------------------------------------------------------------- NumPy reference


def numpy_amos(params, grad_fn, steps, *, eta, slot_axes, xi_fn, b0, beta, zeta):
    """Amos (arXiv 2210.11693, Algorithm 1; the 2⁻¹²⁵ floor of jestimator) in float64 NumPy.

    Per tensor, with `v̄` the mean of `g²` over the slot's reduced axes and
    `α = ξ η`: `v ← β v + (1 − β) v̄`, `v̂ = max(v, 2⁻¹²⁵) / (1 − βᵗ)`,
    `c = (1 + ζ √ξ b)^(−1/2)`, `d = 1 / (1 + ζ √α b)`, `γ = c ξ² v̄ / v̂`,
    `θ ← θ − d (α g / √v̂ + ½ γ θ)`, `b ← b (1 + γ) + γ`.

    params: dict name -> array; slot_axes: name -> axes `g²` is averaged over
    (None for all); b0: name -> initial `b`. Returns the parameters after each step
    and the final slots.
    """
    theta = {k: np.array(x, np.float64) for k, x in params.items()}
    v, b = {}, {}
    for name, value in theta.items():
        axes = slot_axes[name]
        shape = () if axes is None else tuple(
            1 if i in axes else n for i, n in enumerate(value.shape))
        v[name] = np.zeros(shape)
        b[name] = np.full(shape, b0[name])
    history = []
    for t in range(1, steps + 1):
        grads = grad_fn(theta, t - 1)
        xi = xi_fn(t - 1)
        for name in theta:
            g, axes = grads[name], slot_axes[name]
            mean_g2 = np.mean(g * g) if axes is None else np.mean(g * g, axis=axes,
                                                                   keepdims=True)
            v[name] = beta * v[name] + (1 - beta) * mean_g2
            v_hat = np.maximum(v[name], 2.0 ** -125) / (1 - beta ** t)
            alpha = xi * eta[name]
            c = 1 / np.sqrt(1 + zeta * np.sqrt(xi) * b[name])
            d = 1 / (1 + zeta * np.sqrt(alpha) * b[name])
            gamma = c * xi ** 2 * mean_g2 / v_hat
            theta[name] = theta[name] - d * (alpha * g / np.sqrt(v_hat)
                                             + 0.5 * gamma * theta[name])
            b[name] = b[name] * (1 + gamma) + gamma
        history.append({k: x.copy() for k, x in theta.items()})
    return history, v, b


def _mixed_problem(rng):
    """A pytree of a full-slot matrix, a factored matrix, a bias, a scalar and a 3-D tensor."""
    params = {
        "mat_full": rng.normal(size=(6, 5)) / math.sqrt(6),
        "mat_reduced": rng.normal(size=(8, 3)) / math.sqrt(8),
        "bias": np.zeros(5),
        "scalar": np.array(rng.normal()),
        "tensor3": rng.normal(size=(2, 3, 4)) * 0.1,
    }
    targets = {k: rng.normal(size=np.shape(x)) * 0.3 for k, x in params.items()}
    noise = {k: rng.normal(size=(100, *np.shape(x))) for k, x in params.items()}
    curvature = {k: rng.uniform(0.5, 2.0, size=np.shape(x)) for k, x in params.items()}

    def grad_fn(theta, step, xp=np):
        # Noisy gradient of a separable quadratic: depends on the trajectory.
        return {k: curvature[k] * (theta[k] - targets[k]) + 0.3 * xp.asarray(noise[k])[step]
                for k in theta}

    slot_axes = {"mat_full": (), "mat_reduced": (0,), "bias": (), "scalar": (),
                 "tensor3": None}

    def shape_fn(path, shape):  # the slot shapes of `slot_axes`, as a plain callable
        axes = slot_axes[path]
        return () if axes is None else tuple(1 if i in axes else n for i, n in enumerate(shape))

    return params, grad_fn, slot_axes, shape_fn


@pytest.mark.parametrize("variant", ["defaults", "schedule_and_init_b"])
def test_scale_by_amos_matches_numpy_over_100_steps(rng, variant):
    params, grad_fn, slot_axes, shape_fn = _mixed_problem(rng)
    eta = {"mat_full": 1 / math.sqrt(6), "mat_reduced": 0.35, "bias": 0.5, "scalar": 0.5,
           "tensor3": 0.1}
    if variant == "defaults":
        xi_fn, b0 = (lambda c: 0.05), dict.fromkeys(params, 0.0)
        xi, beta, zeta, options = 0.05, 0.999, 0.25, {}  # the defaults
    else:
        xi_fn = lambda c: 0.08 / (1 + 0.02 * c)  # noqa: E731
        b0 = {k: (3.0 if k == "mat_full" else 0.0) for k in params}
        xi, beta, zeta = xi_fn, 0.99, 0.5
        options = {"beta": beta, "zeta": zeta, "init_b_fn": lambda path, shape: b0[path]}
    history, v_ref, b_ref = numpy_amos(params, grad_fn, 100, eta=eta, slot_axes=slot_axes,
                                       xi_fn=xi_fn, b0=b0, beta=beta, zeta=zeta)

    with jax.enable_x64(True):
        tx = optim.scale_by_amos(xi, lambda path, shape: eta[path], shape_fn, **options)
        theta = {k: jnp.asarray(x, jnp.float64) for k, x in params.items()}
        state = tx.init(theta)

        @jax.jit
        def step(theta, state, count):
            updates, state = tx.update(grad_fn(theta, count, xp=jnp), state, theta)
            return optax.apply_updates(theta, updates), state

        for t in range(100):
            theta, state = step(theta, state, t)
            if t in (0, 9, 99):
                for k in params:
                    np.testing.assert_allclose(np.asarray(theta[k]), history[t][k],
                                               rtol=1e-6, atol=1e-12, err_msg=f"{k} step {t}")
        assert int(state.count) == 100
        for k in params:
            assert state.v[k].shape == v_ref[k].shape
            np.testing.assert_allclose(np.asarray(state.v[k]), v_ref[k], rtol=1e-6)
            np.testing.assert_allclose(np.asarray(state.b[k]), b_ref[k], rtol=1e-6, atol=1e-15)
    # b grows: the adaptive decay is doing something in this run.
    assert all(np.all(b_ref[k] > b0[k]) for k in params)


def test_amos_clip_and_momentum_are_the_optax_pieces(rng):
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(4, 3)) * 3, jnp.float32)} for _ in range(3)]
    eta_fn = optim.eta_fn_from_rules([("w", 0.5)])
    tx = optim.amos(0.1, eta_fn, clip_value=1.0, momentum=0.9)
    reference = optax.chain(optax.clip(1.0), optim.scale_by_amos(0.1, eta_fn),
                            optax.ema(0.9, debias=False))
    s1, s2 = tx.init(params), reference.init(params)
    for g in grads:
        u1, s1 = tx.update(g, s1, params)
        u2, s2 = reference.update(g, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
    # Without the options amos *is* scale_by_amos.
    plain_state = optim.amos(0.1, eta_fn).init(params)
    assert isinstance(plain_state, optim.ScaleByAmosState)


def test_slots_keep_the_param_dtype_and_updates_the_grad_dtype(rng):
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)}
    tx = optim.amos(0.1, optim.eta_fn_from_init(params))
    state = tx.init(params)
    grads = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert state.v["w"].dtype == state.b["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))


def test_multisteps_accumulates_like_one_step_on_the_mean_gradient(rng):
    params = {"w": jnp.asarray(rng.normal(size=(5, 4)) * 0.3, jnp.float32),
              "b": jnp.zeros(4)}
    eta_fn = optim.eta_fn_from_init(params)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
             for _ in range(4)]
    accumulate = optax.MultiSteps(optim.amos(0.1, eta_fn), every_k_schedule=2)
    direct = optim.amos(0.1, eta_fn)
    p1, s1 = params, accumulate.init(params)
    p2, s2 = params, direct.init(params)
    for i, g in enumerate(grads):
        u, s1 = accumulate.update(g, s1, p1)
        p1 = optax.apply_updates(p1, u)
        if i % 2 == 1:
            mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[i - 1], g)
            u, s2 = direct.update(mean, s2, p2)
            p2 = optax.apply_updates(p2, u)
            chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)
    assert int(s1.inner_opt_state.count) == 2


def test_apply_if_finite_skips_a_nan_step(rng):
    params = {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}
    eta_fn = optim.eta_fn_from_init(params)
    guarded, plain = optax.apply_if_finite(optim.amos(0.1, eta_fn), 3), optim.amos(0.1, eta_fn)
    good = [{"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)} for _ in range(2)]
    bad = {"w": jnp.full((3, 3), jnp.nan)}
    p1, s1 = params, guarded.init(params)
    for g in (good[0], bad, good[1]):
        u, s1 = guarded.update(g, s1, p1)
        p1 = optax.apply_updates(p1, u)
    p2, s2 = params, plain.init(params)
    for g in good:
        u, s2 = plain.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    # The guarded step runs under a `where`, so float32 rounding may differ in the last
    # bit: compare at float32 resolution of the O(1) parameters, also near zero.
    np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6, atol=1e-7)
    assert int(s1.inner_state.count) == 2 and int(s1.total_notfinite) == 1


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_state_gives_the_same_steps_as_a_plain_dict(rng):
    model = _MLP(nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, state = nnx.split(model, nnx.Param)
    assert set(optim.parameter_paths(state)) == {
        "hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)

    def loss(params_state):
        return jnp.mean((nnx.merge(graphdef, params_state)(x) - y) ** 2)

    tx = optim.amos(0.05, optim.eta_fn_from_init(state), optim.reduce_largest_axes())
    opt_state = tx.init(state)
    # The slots mirror the NNX state (so nnx/orbax tooling handles them alike).
    assert jax.tree.structure(opt_state.v) == jax.tree.structure(state)
    plain = nnx.to_pure_dict(state)
    plain_tx = optim.amos(0.05, optim.eta_fn_from_init(plain), optim.reduce_largest_axes())
    plain_state = plain_tx.init(plain)

    @jax.jit
    def step(params_state, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params_state), opt_state, params_state)
        return optax.apply_updates(params_state, updates), opt_state

    for _ in range(3):
        grads = nnx.to_pure_dict(jax.grad(loss)(state))
        state, opt_state = step(state, opt_state)
        updates, plain_state = plain_tx.update(grads, plain_state, plain)
        plain = optax.apply_updates(plain, updates)
    # One path jitted, the other eager: float32 rounding differs (fusion), by up to a few
    # 1e-7 on parameters of size ~0.05 after 3 steps (seed 3355550375100671462: 4.4e-7).
    chex.assert_trees_all_close(nnx.to_pure_dict(state), plain, rtol=1e-5, atol=2e-6)


def test_sharded_state_follows_params_and_matches_unsharded(rng):
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    specs = {"kernel": P("fsdp", "tensor"), "bias": P("tensor"), "embed": P("fsdp", None)}
    params = {"kernel": rng.normal(size=(16, 8)) / 4, "bias": np.zeros(8),
              "embed": rng.normal(size=(32, 4))}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    grads = [{k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
             for _ in range(4)]
    tx = optim.amos(0.1, optim.eta_fn_from_init(params), optim.shape_fn_from_rules(
        [("kernel", "(1, SHAPE[1])"), ("embed", ()), ("bias", "SHAPE")]))
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)), donate_argnums=(0, 1))

    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    sharded_grads = [{k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in g.items()}
                     for g in grads]
    p1, s1 = sharded, tx.init(sharded)
    p2, s2 = params, tx.init(params)
    expected = {"kernel": P(None, "tensor"), "bias": P("tensor"), "embed": P()}
    for _ in range(2):
        for k, spec in expected.items():
            for slot in (s1.v[k], s1.b[k]):
                assert slot.sharding.is_equivalent_to(NamedSharding(mesh, spec), slot.ndim), (
                    k, slot.sharding)
        for g1, g2 in zip(sharded_grads, grads, strict=True):
            p1, s1 = step(p1, s1, g1)
            p2, s2 = step(p2, s2, g2)
    for k in params:
        assert p1[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), p1[k].ndim)
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s1.b[k], s2.b[k], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------- errors


def test_errors_name_the_parameter_path():
    params = {"dense": {"kernel": jnp.ones((3, 4)) * jnp.arange(4.0), "bias": jnp.zeros(4)}}
    only_kernels = optim.eta_fn_from_rules([("kernel$", "1/sqrt(fan_in)")])
    with pytest.raises(ValueError, match=r"no scale rule matches parameter 'dense/bias'"):
        optim.amos(0.1, only_kernels).init(params)
    negative = lambda path, shape: -1.0 if path.endswith("bias") else 0.1  # noqa: E731
    with pytest.raises(ValueError, match=r"eta for parameter 'dense/bias'.*positive"):
        optim.amos(0.1, negative).init(params)
    bad_slot = optim.shape_fn_from_rules([("kernel", (3,)), (".*", "SHAPE")])
    with pytest.raises(ValueError, match=r"slot shape for parameter 'dense/kernel'"):
        optim.amos(0.1, optim.eta_fn_from_init(params), bad_slot).init(params)
    with pytest.raises(ValueError, match=r"init_b for parameter 'dense/kernel'"):
        optim.amos(0.1, optim.eta_fn_from_init(params),
                   init_b_fn=lambda p, s: -2.0 if p.endswith("kernel") else 0.0).init(params)
    tx = optim.amos(0.1, optim.eta_fn_from_init(params))
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"beta": 1.0}, "beta"),
    ({"zeta": -0.5}, "zeta"),
    ({"momentum": 1.0}, "momentum"),
    ({"clip_value": 0.0}, "clip_value"),
])
def test_bad_hyper_parameters_raise(kwargs, match):
    arguments = {"learning_rate": 0.1, "eta_fn": lambda path, shape: 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        optim.amos(**arguments)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler option")
def test_cpu_compiler_options_update_slots_in_place_with_identical_results():
    """`CPU_COMPILER_OPTIONS` removes XLA:CPU's copy of every donated `b` and changes no bit."""
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)) / 8, "b": jnp.zeros(32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-2) + 1e-3 * p, params)
    tx = optim.amos(0.05, optim.eta_fn_from_init(params))

    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    results, copies = [], []
    for options in (None, optim.CPU_COMPILER_OPTIONS):
        jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=options)
        p, s = jax.tree.map(jnp.copy, params), tx.init(params)
        hlo = jitted.lower(p, s).compile().as_text()
        copies.append(hlo[hlo.index("ENTRY"):].count(" copy("))
        for _ in range(3):
            p, s = jitted(p, s)
        results.append((p, s))
    assert copies[0] > 0 and copies[1] == 0, copies
    chex.assert_trees_all_equal(results[0], results[1])
