"""Amos: Adam-style scaling with weight and learning-rate decay that adapt on their own.

Amos (Tian & Parikh, "Amos: An Adam-style Optimizer with Adaptive Weight Decay
towards Model-Oriented Scale", arXiv 2210.11693; reference code
google-research/jestimator) needs one hyper-parameter per tensor, the scale `η` its
trained entries are expected to have (see `kexue.optim.rules`), plus a global rate
`ξ` of about `1/√(number of batches)`. Per tensor, at step `t = 1, 2, ...`, with
gradient `g` and slots `v` (second moment, possibly averaged over some axes) and `b`
(decay accumulator, initially 0), the update of the paper's Algorithm 1 (as in
jestimator's `amos.py`, whose `c_coef` and `d_coef` are both `ζ` here):

    g2 = mean(g²) over the slot's reduced axes
    v ← β v + (1 − β) g2
    r = (1 − βᵗ) / max(v, ε)                              (bias-corrected 1/v̂)
    γ = ξ² · r · g2 / √(1 + ζ √ξ b)
    α = ξ η
    Δθ = −(α √r g + ½ γ θ) / (1 + ζ √α b)
    b ← b + γ (1 + b)

`γ` is the adaptive weight decay; the two factors in `b` make both the decay and the
effective learning rate fall as training goes on, without a hand-made schedule.
`init_b_fn` may start `b` above 0 (the same equations, resumed as if the tensor had
already been trained for a while): not part of the paper, whose `b` starts at 0, but
of jestimator's code before its first release, which offered it for weights restored
from a pre-trained checkpoint, to keep them from moving far.

On XLA:CPU, jit the train step with `compiler_options=CPU_COMPILER_OPTIONS` when the
optimizer state is donated: the parameter update and the `b` update both read the old
`b`, and XLA:CPU's default copy insertion then copies every `b` slot before updating
it in place (2.4x AdamW's step time instead of 1.3x; benchmarks/RESULTS.md). GPU and
TPU compilers do not need (or accept) this option.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from kexue.ops._checks import check_number
from kexue.optim.rules import (
    ParamRule,
    Shape,
    check_scale,
    check_slot_shape,
    flatten_with_parameter_paths,
)
from kexue.parallel import reduced_sharding

__all__ = ["AMOS_EPSILON", "CPU_COMPILER_OPTIONS", "ScaleByAmosState", "amos", "scale_by_amos"]

ScalarOrSchedule = float | optax.Schedule

AMOS_EPSILON = 2.0 ** -125
"""Floor of `v` in `1/max(v, ε)`: tiny but a normal float32, so `√r` stays finite."""

CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
"""`jax.jit(step, donate_argnums=..., compiler_options=CPU_COMPILER_OPTIONS)` on CPU only.

Copy insertion with region analysis sees that the old slot is read before it is
overwritten and updates donated slots in place instead of copying them first.
"""


class ScaleByAmosState(NamedTuple):
    """State of `scale_by_amos`.

    Attributes:
      count: int32 scalar, the number of updates done.
      v: pytree like the params; each leaf has the slot shape of its parameter
        (the parameter's shape, some axes set to 1, or `()`): the second moment.
      b: pytree like `v`: the decay accumulator.
    """

    count: jax.Array
    v: Any
    b: Any


def _check_rate(name: str, value: Any) -> None:
    """A constant rate must be a positive finite number; a schedule is taken as it is."""
    if not callable(value):
        check_number(name, value)


def _check_open_unit(name: str, value: Any, *, allow_zero: bool = False) -> float:
    return check_number(name, value, strict=not allow_zero, below=1.0)


def _compute_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _slot_placement(theta: Any, slot_shape: Shape) -> Any:
    """Where a slot of a concrete, sharded parameter goes: sharded like it, reduced axes whole.

    Returns None (default placement) for tracers and unsharded inputs; inside `jit`
    the slots' layout is set by `out_shardings` or XLA's propagation.
    """
    if isinstance(theta, jax.core.Tracer) or not isinstance(theta, jax.Array):
        return None
    sharding = getattr(theta, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return sharding
    return reduced_sharding(sharding, tuple(theta.shape), tuple(slot_shape))


class _LeafSettings(NamedTuple):
    eta: float
    slot_shape: Shape
    reduced_axes: tuple[int, ...] | None  # None: mean over all entries (slot shape ()).


def _leaf_settings(path: str, shape: Shape, eta_fn: ParamRule,
                   shape_fn: ParamRule | None) -> _LeafSettings:
    eta = check_scale("eta", path, shape, eta_fn(path, shape))
    slot_shape = shape if shape_fn is None else check_slot_shape(
        path, shape, shape_fn(path, shape))
    if slot_shape == () and shape != ():
        reduced = None
    else:
        reduced = tuple(axis for axis, (slot, dim) in enumerate(zip(slot_shape, shape, strict=True))
                        if slot != dim)
    return _LeafSettings(eta, slot_shape, reduced)


def scale_by_amos(
    learning_rate: ScalarOrSchedule,
    eta_fn: ParamRule,
    shape_fn: ParamRule | None = None,
    *,
    beta: float = 0.999,
    zeta: float = 0.25,
    init_b_fn: ParamRule | None = None,
    epsilon: float = AMOS_EPSILON,
) -> optax.GradientTransformation:
    """The Amos update `Δθ` (arXiv 2210.11693), ready to be added to the parameters.

    See the module docstring for the equations. The output already contains the
    sign and the learning rate: chain nothing after it but momentum (`amos` does).

    Args:
      learning_rate: the global rate `ξ` (about `1/√(number of batches)`), or a
        schedule of the step count (0 on the first update, as in Optax).
      eta_fn: `rule(path, shape) -> η > 0`, the expected scale of the trained
        entries of each tensor; see `eta_fn_from_init` and `eta_fn_from_rules`.
        Paths are '/'-joined (`"dense/kernel"`).
      shape_fn: `rule(path, shape) -> slot shape`: `()`, or the parameter's shape
        with axes to average `g²` over set to 1 (see `reduce_largest_axes`). None
        keeps full slots.
      beta: decay of the second-moment average, in (0, 1).
      zeta: how fast `b` slows the updates down, >= 0.
      init_b_fn: `rule(path, shape) -> b_0 >= 0` (see the module docstring); a large
        value (growing with the number of pre-training epochs) for restored weights
        keeps them from moving far. None starts every `b` at 0, as the paper does.
      epsilon: floor of `v` before taking its reciprocal.

    Returns:
      An `optax.GradientTransformation` whose state is a `ScaleByAmosState`. `init`
      places each slot of a sharded parameter on its mesh, reduced axes replicated.

    Raises:
      ValueError: at construction for a non-positive constant rate or `beta`/`zeta`
        out of range; at `init`/`update`, naming the parameter path, when `eta_fn`
        matches nothing or gives a non-positive value, `shape_fn` gives a bad slot
        shape, or `init_b_fn` a negative value; at `update` without params.
    """
    _check_rate("learning_rate", learning_rate)
    beta = _check_open_unit("beta", beta)
    check_number("zeta", zeta, strict=False)
    check_number("epsilon", epsilon)

    def settings(params: Any) -> tuple[list[tuple[str, Any]], Any, list[_LeafSettings]]:
        pairs, treedef = flatten_with_parameter_paths(params)
        return pairs, treedef, [
            _leaf_settings(path, tuple(jnp.shape(theta)), eta_fn, shape_fn)
            for path, theta in pairs
        ]

    def init_fn(params: Any) -> ScaleByAmosState:
        pairs, treedef, leaf_settings = settings(params)
        v_leaves, b_leaves = [], []
        for (path, theta), leaf in zip(pairs, leaf_settings, strict=True):
            dtype = jnp.result_type(theta)
            placement = _slot_placement(theta, leaf.slot_shape)
            b0 = 0.0
            if init_b_fn is not None:
                b0 = init_b_fn(path, tuple(jnp.shape(theta)))
                if isinstance(b0, bool) or not isinstance(b0, numbers.Real) or not (
                        math.isfinite(b0) and b0 >= 0):
                    raise ValueError(
                        f"init_b for parameter {path!r} (shape {tuple(jnp.shape(theta))}) "
                        f"must be a non-negative number; got {b0!r}"
                    )
            v_leaves.append(jnp.zeros(leaf.slot_shape, dtype, device=placement))
            b_leaves.append(jnp.full(leaf.slot_shape, b0, dtype, device=placement))
        return ScaleByAmosState(
            count=jnp.zeros([], jnp.int32),
            v=treedef.unflatten(v_leaves),
            b=treedef.unflatten(b_leaves),
        )

    def update_fn(updates: Any, state: ScaleByAmosState, params: Any = None):
        if params is None:
            raise ValueError(
                "scale_by_amos needs the params: call update(updates, state, params)")
        pairs, treedef, leaf_settings = settings(params)
        grads = treedef.flatten_up_to(updates)
        vs = treedef.flatten_up_to(state.v)
        bs = treedef.flatten_up_to(state.b)
        xi = learning_rate(state.count) if callable(learning_rate) else learning_rate
        t = optax.safe_int32_increment(state.count)

        new_updates, new_v, new_b = [], [], []
        for (_, theta), leaf, g, v, b in zip(pairs, leaf_settings, grads, vs, bs, strict=True):
            dtype = _compute_dtype(jnp.result_type(theta, g))
            g_c, theta_c = jnp.asarray(g, dtype), jnp.asarray(theta, dtype)
            v_c, b_c = jnp.asarray(v, dtype), jnp.asarray(b, dtype)
            xi_c = jnp.asarray(xi, dtype)
            square = g_c * g_c
            if leaf.reduced_axes is None:
                g2 = jnp.mean(square)
            elif leaf.reduced_axes:
                g2 = jnp.mean(square, axis=leaf.reduced_axes, keepdims=True)
            else:
                g2 = square
            v_c = beta * v_c + (1.0 - beta) * g2
            v_floor = jnp.maximum(v_c, epsilon)
            bias_correction = 1.0 - jnp.asarray(beta, dtype) ** t.astype(dtype)
            alpha = xi_c * leaf.eta
            kappa_c, kappa_d = zeta * jnp.sqrt(xi_c), zeta * jnp.sqrt(alpha)
            gamma_scale = xi_c * xi_c * bias_correction
            # γ = ξ² r g2 c(b), with r = (1 − βᵗ)/max(v, ε) and c(b) = (1 + ζ√ξ b)^(−1/2).
            gamma = gamma_scale * g2 / (v_floor * jnp.sqrt(1.0 + kappa_c * b_c))
            # Δθ = d(b) (−α √r g − ½ γ θ), over the common denominator
            # √v · s · (1 + ζ√α b) with s = √(v (1 + ζ√ξ b)): sqrt and divide only, and
            # nothing shared with γ above, so XLA fuses each output into one loop.
            s_c = jnp.sqrt(v_floor + kappa_c * (b_c * v_floor))
            step = (-alpha * jnp.sqrt(bias_correction) * g_c * s_c
                    - 0.5 * gamma_scale * g2 * theta_c) / (
                jnp.sqrt(v_floor) * s_c * (1.0 + kappa_d * b_c))
            b_c = b_c + gamma * (1.0 + b_c)
            new_updates.append(step.astype(jnp.result_type(g)))
            new_v.append(v_c.astype(jnp.result_type(v)))
            new_b.append(b_c.astype(jnp.result_type(b)))
        return treedef.unflatten(new_updates), ScaleByAmosState(
            count=t, v=treedef.unflatten(new_v), b=treedef.unflatten(new_b))

    return optax.GradientTransformation(init_fn, update_fn)


def amos(
    learning_rate: ScalarOrSchedule,
    eta_fn: ParamRule,
    shape_fn: ParamRule | None = None,
    beta: float = 0.999,
    zeta: float = 0.25,
    momentum: float | None = None,
    clip_value: float | None = None,
    init_b_fn: ParamRule | None = None,
    *,
    epsilon: float = AMOS_EPSILON,
) -> optax.GradientTransformation:
    """The Amos optimizer: optional clipping, `scale_by_amos`, optional momentum.

    `optax.chain(optax.clip(clip_value), scale_by_amos(...), optax.ema(momentum,
    debias=False))`, the first and last only when asked for. Apply the result with
    `optax.apply_updates` (the updates already carry the minus sign).

    Args:
      learning_rate: global rate `ξ`, about `1/√(number of batches)`; a number or a
        schedule (step 0 on the first update).
      eta_fn: per-tensor scale rule, e.g. `eta_fn_from_init(params)`.
      shape_fn: slot-shape rule, e.g. `reduce_largest_axes()` for factored slots.
      beta, zeta, init_b_fn, epsilon: see `scale_by_amos`.
      momentum: decay in [0, 1) of an exponential moving average of the updates
        (no bias correction); None or 0 for none.
      clip_value: clip each gradient entry to `[-clip_value, clip_value]` first;
        None for no clipping.

    Returns:
      An `optax.GradientTransformation`.

    Raises:
      ValueError: as `scale_by_amos`; also for `momentum` outside [0, 1) or a
        non-positive `clip_value`.
    """
    chain: list[optax.GradientTransformation] = []
    if clip_value is not None:
        check_number("clip_value", clip_value)
        chain.append(optax.clip(clip_value))
    chain.append(scale_by_amos(learning_rate, eta_fn, shape_fn, beta=beta, zeta=zeta,
                               init_b_fn=init_b_fn, epsilon=epsilon))
    if momentum is not None:
        momentum = _check_open_unit("momentum", momentum, allow_zero=True)
        if momentum > 0:
            chain.append(optax.ema(momentum, debias=False))
    return chain[0] if len(chain) == 1 else optax.chain(*chain)

