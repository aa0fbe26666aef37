"""Amos-style learning-rate and weight-decay schedules for any optimizer (kexue.fm/archives/9344).

Su writes a step as `θ ← θ − (α_t u_t + ρ_t θ)` and, following Amos, derives per
tensor (with `k` entries and expected scale `σ`, the `η` of Amos):

* the update normalised per tensor, `α_t u_t = α₀ · √k σ · u_t/‖u_t‖ · decay(t)`
  (using `‖θ_t‖` in place of `√k σ` would give LAMB);
* decoupled weight decay `ρ_t = α₀²/(2q) · decay(t)`, `q ≈ 1`;
* `decay(t)` from `amos_decay_schedule` (inverse-square or inverse-time law with a
  half-life of `T` steps, optional linear warm-up).

`u_t` is any update direction: Adam, factored second moments (Adafactor-style) or the
sign. `amos_style` chains

    direction → normalize_updates(σ) → × (−α₀ decay(t)) → − ρ_t θ

so its output is added to the parameters with `optax.apply_updates`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kexue.ops._checks import check_number
from kexue.optim.rules import ParamRule, check_scale, flatten_with_parameter_paths
from kexue.optim.schedules import amos_decay_schedule

__all__ = [
    "DIRECTIONS",
    "DecoupledWeightDecayState",
    "amos_style",
    "amos_style_weight_decay",
    "decoupled_weight_decay",
    "normalize_updates",
]

DIRECTIONS = ("adam", "factored", "sign")


def _robust_norm(u: jax.Array) -> jax.Array:
    """`‖u‖` in one pass when `Σu²` is representable, else as `max|u| · ‖u / max|u|‖`.

    The direct sum of squares is one read of `u`; only when it under- or overflows
    (entries below ~1e-16 or above ~1e18 in float32) does `lax.cond` take the rescaled
    form, which reads `u` twice more.
    """
    if u.size == 0:
        return jnp.zeros([], u.dtype)
    squares = jnp.sum(jnp.square(u))
    # Below this the sum has lost bits to subnormals; above it, it may be inf.
    accurate = (squares > jnp.finfo(u.dtype).tiny * 2.0**24) & jnp.isfinite(squares)

    def rescaled(u: jax.Array) -> jax.Array:
        peak = jnp.max(jnp.abs(u))
        safe_peak = jnp.where(peak > 0, peak, 1)
        return peak * jnp.sqrt(jnp.sum(jnp.square(u / safe_peak)))

    return jax.lax.cond(accurate, lambda _: jnp.sqrt(squares), rescaled, u)


def normalize_updates(sigma_fn: ParamRule) -> optax.GradientTransformation:
    """Rescales each tensor of the update to the norm `√k σ`: `u ↦ √k σ · u/‖u‖`.

    The first factor of Su's Amos-style step (kexue.fm/archives/9344): a tensor with
    `k` entries whose entries should have scale `σ` moves, per unit of learning rate,
    by the norm such a tensor has. An all-zero update stays zero. The norm is taken
    in at least float32 as `√Σu²`, falling back to `max|u| · ‖u / max|u|‖` when that
    under- or overflows, so tiny or huge updates keep their direction and norm.

    Args:
      sigma_fn: `rule(path, shape) -> σ > 0` (e.g. `eta_fn_from_init(params)`);
        paths are those of `kexue.optim.parameter_paths`.

    Returns:
      A stateless `optax.GradientTransformation`; updates keep their dtypes.

    Raises:
      ValueError: at `init` or `update`, naming the path, when `sigma_fn` matches
        nothing or gives a non-positive value.
    """

    def sigmas(tree: Any) -> tuple[list[tuple[str, Any]], Any, list[float]]:
        pairs, treedef = flatten_with_parameter_paths(tree)
        values = []
        for path, x in pairs:
            shape = tuple(jnp.shape(x))
            values.append(check_scale("sigma", path, shape, sigma_fn(path, shape)))
        return pairs, treedef, values

    def init_fn(params: Any) -> optax.EmptyState:
        sigmas(params)
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
        del params
        pairs, treedef, values = sigmas(updates)
        out = []
        for (_, u), sigma in zip(pairs, values, strict=True):
            dtype = jnp.promote_types(jnp.result_type(u), jnp.float32)
            u_c = jnp.asarray(u, dtype)
            norm = _robust_norm(u_c)
            target = math.sqrt(max(u_c.size, 1)) * sigma
            factor = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1), 0)
            out.append((u_c * factor).astype(jnp.result_type(u)))
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init_fn, update_fn)


class DecoupledWeightDecayState(NamedTuple):
    """Step counter of `decoupled_weight_decay` (0 before the first update)."""

    count: jax.Array


def decoupled_weight_decay(
    rate: float | optax.Schedule, *, mask: Any = None
) -> optax.GradientTransformation:
    """Adds `−ρ_t θ` to the (already signed and scaled) update: decoupled weight decay.

    Placed *after* the learning-rate scaling, so `ρ_t` is the fraction of `θ` removed
    per step, not multiplied by the learning rate again: the `ρ_t θ` term of
    `θ ← θ − (α_t u_t + ρ_t θ)` (kexue.fm/archives/9344).

    Args:
      rate: `ρ >= 0`, or a schedule of the step count (0 on the first update).
      mask: optional pytree of bools like the params (or a callable giving one),
        as in `optax.masked`: decay only where True.

    Returns:
      An `optax.GradientTransformation` with state `DecoupledWeightDecayState`.

    Raises:
      ValueError: a negative or non-finite constant `rate`; `update` without params.
    """
    if not callable(rate):
        check_number("rate", rate, strict=False)

    def init_fn(params: Any) -> DecoupledWeightDecayState:
        del params
        return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: DecoupledWeightDecayState, params: Any = None):
        if params is None:
            raise ValueError(
                "decoupled_weight_decay needs the params: call update(updates, state, params)")
        rho = rate(state.count) if callable(rate) else rate
        updates = jax.tree.map(
            lambda u, p: (u - jnp.asarray(rho, jnp.result_type(u)) * p).astype(jnp.result_type(u)),
            updates, params)
        return updates, DecoupledWeightDecayState(count=optax.safe_int32_increment(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    return transform if mask is None else optax.masked(transform, mask)


def amos_style_weight_decay(
    learning_rate: float,
    *,
    half_life: float,
    kind: str = "inverse_square",
    q: float = 1.0,
    warmup_steps: int = 0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """`decoupled_weight_decay` with `ρ_t = α₀²/(2q) · decay(t)` (kexue.fm/archives/9344).

    `decay` is `amos_decay_schedule(kind, half_life=..., warmup_steps=...)`, the same
    factor that scales the learning rate, so `ρ_t/α_t = α₀/(2q)` at every step.

    Raises:
      ValueError: non-positive `learning_rate` (`α₀`) or `q`, or a bad schedule setting.
    """
    alpha0 = check_number("learning_rate", learning_rate)
    q = check_number("q", q)
    schedule = amos_decay_schedule(kind, half_life=half_life, warmup_steps=warmup_steps,
                                   init_value=alpha0 * alpha0 / (2.0 * q))
    return decoupled_weight_decay(schedule, mask=mask)


def _direction(direction: str, kwargs: Mapping[str, Any]) -> optax.GradientTransformation:
    if direction == "adam":
        return optax.scale_by_adam(**kwargs)
    if direction == "factored":
        return optax.scale_by_factored_rms(**kwargs)
    if direction == "sign":
        return optax.scale_by_sign(**kwargs)
    raise ValueError(f"`direction` must be one of {list(DIRECTIONS)}; got {direction!r}")


def amos_style(
    learning_rate: float,
    *,
    direction: str = "adam",
    sigma_fn: ParamRule,
    half_life: float,
    kind: str = "inverse_square",
    q: float = 1.0,
    warmup_steps: int = 0,
    direction_kwargs: Mapping[str, Any] | None = None,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """An Amos-style optimizer: `θ ← θ − (α_t u_t + ρ_t θ)` (kexue.fm/archives/9344).

    `α_t u_t = α₀ · √k σ · d_t/‖d_t‖ · decay(t)` with `d_t` the update direction, and
    `ρ_t = α₀²/(2q) · decay(t)`, both with `decay = amos_decay_schedule(kind,
    half_life=half_life, warmup_steps=warmup_steps)`.

    Args:
      learning_rate: `α₀ > 0`, the relative size of a step (each tensor moves by
        `α₀ √k σ` per step before decay).
      direction: the direction `d_t`: "adam" (`optax.scale_by_adam`), "factored"
        (`optax.scale_by_factored_rms`, Adafactor's factored second moments, small
        slots) or "sign" (`optax.scale_by_sign`, no slots).
      sigma_fn: per-tensor scale `σ`, `rule(path, shape) -> float`, e.g.
        `eta_fn_from_init(params)`.
      half_life: `T`, steps after which `decay` has halved.
      kind: "inverse_square" (`1/(1 + (√2−1)t/T)²`) or "inverse_time" (`1/(1 + t/T)`).
      q: weight-decay constant, `≈ 1`.
      warmup_steps: linear warm-up of `decay` (and so of both rates); 0 for none.
      direction_kwargs: keyword arguments for the direction's transformation (e.g.
        `{"b1": 0.9, "b2": 0.98}` for Adam).
      weight_decay_mask: as `optax.masked`'s mask; decay only where True. None
        decays every tensor, as Amos does.

    Returns:
      An `optax.GradientTransformation` (an `optax.chain`).

    Raises:
      ValueError: unknown `direction` or `kind`; non-positive `learning_rate`, `q` or
        `half_life`; negative `warmup_steps`; at `init`, `sigma_fn` failing for a
        parameter (the message names its path).
    """
    alpha0 = check_number("learning_rate", learning_rate)
    update_direction = _direction(direction, dict(direction_kwargs or {}))
    learning_rate_schedule = amos_decay_schedule(kind, half_life=half_life,
                                                 warmup_steps=warmup_steps, init_value=alpha0)
    return optax.chain(
        update_direction,
        normalize_updates(sigma_fn),
        optax.scale_by_learning_rate(learning_rate_schedule),
        amos_style_weight_decay(alpha0, half_life=half_life, kind=kind, q=q,
                                warmup_steps=warmup_steps, mask=weight_decay_mask),
    )
