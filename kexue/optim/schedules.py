"""The two decay laws of the Amos-style recipe (kexue.fm/archives/9344), as Optax schedules.

With the update written `θ ← θ − (α_t u_t + ρ_t θ)`, Su's derivation makes both the
learning rate and the weight decay follow one factor `decay(t)`:

* `"inverse_square"` (constant convergence rate `p`): `decay(t) = 1/(α₀ p t + 1)²`;
  the factor halves after `T` steps when `α₀ p = (√2 − 1)/T`.
* `"inverse_time"` (convergence slowing with the distance to the optimum):
  `decay(t) = 1/(2 α₀ p₀ t + 1)`; it halves after `T` steps when `2 α₀ p₀ = 1/T`.

Both are parameterised here by that half-life `T` in steps, so `decay(T) = 1/2`
exactly for either kind.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from kexue.ops._checks import check_int, check_number

DECAY_KINDS = ("inverse_square", "inverse_time")


def amos_decay_schedule(
    kind: str = "inverse_square",
    *,
    half_life: float,
    warmup_steps: int = 0,
    init_value: float = 1.0,
) -> optax.Schedule:
    """`init_value · decay(t) · warmup(t)`, the Amos-style decay factor (archive 9344).

    * `kind="inverse_square"`: `decay(t) = 1 / (1 + (√2 − 1) t / T)²`;
    * `kind="inverse_time"`:   `decay(t) = 1 / (1 + t / T)`;
    * `warmup(t) = min(1, t / warmup_steps)` (1 when `warmup_steps == 0`): a linear
      ramp from 0 that multiplies the decay, which itself counts from step 0.

    `T = half_life`, so `decay(T) = 1/2` exactly. The step `t` is the count an Optax
    schedule receives (0 on the first update).

    Args:
      kind: "inverse_square" or "inverse_time".
      half_life: `T > 0`, in steps.
      warmup_steps: length of the linear warm-up; 0 for none.
      init_value: the value at `t = 0` without warm-up (e.g. the learning rate `α₀`).

    Returns:
      A schedule `step -> float array` (float32, or float64 under `jax_enable_x64`),
      usable under `jax.jit`.

    Raises:
      ValueError: unknown `kind`, `half_life <= 0`, `warmup_steps < 0` or a
        non-finite `init_value`.
    """
    if kind not in DECAY_KINDS:
        raise ValueError(f"`kind` must be one of {list(DECAY_KINDS)}; got {kind!r}")
    half_life = check_number("half_life", half_life)
    check_int("warmup_steps", warmup_steps, least=0)
    check_number("init_value", init_value, least=-math.inf)
    rate = (math.sqrt(2.0) - 1.0) / half_life if kind == "inverse_square" else 1.0 / half_life
    square = kind == "inverse_square"

    def schedule(step):
        t = jnp.asarray(step).astype(jnp.result_type(float))
        base = 1.0 + rate * t
        value = init_value / (base * base if square else base)
        if warmup_steps:
            value = value * jnp.minimum(1.0, t / warmup_steps)
        return value

    return schedule
