"""Named optimizers from plain arguments: the one place their defaults live.

    tx = make_optimizer("amos", {"learning_rate": 0.1}, num_steps=400,
                        initial_params=params, clip_norm=1.0)
    optimizer_defaults("adamw")   # {"learning_rate": 0.001, "b1": 0.9, ...}
    rate = learning_rate_schedule("adamw", {"learning_rate": 3e-3}, num_steps=400)
    rate(0), rate(399)            # the global rate of the first and the last update

Each recipe is a function whose keyword defaults are the recommended settings of that
optimizer for kexue's models; `optimizer_defaults` reads them off the signature, so a
config section built from it (configs/common.py) cannot drift from what an omitted
setting means here. `num_steps` (the length of the run, for schedules) and
`initial_params` (the parameters at initialisation, from which Amos reads each
tensor's scale η / σ) are supplied by the caller, never by a config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

from kexue.ops._checks import check_number
from kexue.optim.amos import amos
from kexue.optim.amos_style import amos_style
from kexue.optim.rules import eta_fn_from_init, reduce_largest_axes
from kexue.optim.schedules import amos_decay_schedule

__all__ = ["OPTIMIZERS", "RECIPES", "learning_rate_schedule", "make_optimizer",
           "optimizer_defaults"]

#: Arguments a recipe receives from its caller rather than from its settings.
_SUPPLIED = ("num_steps", "initial_params")
ADAMW_SCHEDULES = ("constant", "cosine")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}`: expected one of {list(choices)}; got {value!r}")


def adamw_recipe(learning_rate: float = 1e-3, *, num_steps: int, initial_params: Any = None,
          b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8, weight_decay: float = 0.01,
          warmup_steps: int = 50, schedule: str = "cosine") -> optax.GradientTransformation:
    """`optax.adamw` with a linear warm-up from 0 to `learning_rate` over `warmup_steps`
    (none when 0: the first step already takes the full rate), then constant or cosine
    decay to 0 at `num_steps`."""
    del initial_params
    rate = _adamw_rate(learning_rate, num_steps, warmup_steps, schedule)
    return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _adamw_rate(learning_rate: float, num_steps: int, warmup_steps: int,
                schedule: str) -> optax.Schedule:
    _check_choice("schedule", schedule, ADAMW_SCHEDULES)
    warmup = int(warmup_steps)
    if schedule == "cosine":
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                      max(num_steps, warmup + 1))
        return optax.cosine_decay_schedule(learning_rate, max(num_steps, 1))
    if warmup:
        return optax.linear_schedule(0.0, learning_rate, warmup)
    return optax.constant_schedule(learning_rate)


def _amos(learning_rate: float, initial_params: Any, beta: float, zeta: float,
          momentum: float, factored: bool) -> optax.GradientTransformation:
    return amos(learning_rate, eta_fn_from_init(initial_params),
                reduce_largest_axes() if factored else None,
                beta=beta, zeta=zeta, momentum=momentum)


def amos_recipe(learning_rate: float = 0.05, *, num_steps: int, initial_params: Any,
                beta: float = 0.98, zeta: float = 0.25,
                momentum: float = 0.9) -> optax.GradientTransformation:
    """Amos (arXiv 2210.11693) with η of each tensor read off its initial values."""
    del num_steps
    return _amos(learning_rate, initial_params, beta, zeta, momentum, factored=False)


def amos_factored_recipe(learning_rate: float = 0.05, *, num_steps: int, initial_params: Any,
                         beta: float = 0.98, zeta: float = 0.25,
                         momentum: float = 0.9) -> optax.GradientTransformation:
    """`amos_recipe` with the second-moment slots reduced to one value per row
    (`reduce_largest_axes`): the memory-light Amos of the paper."""
    del num_steps
    return _amos(learning_rate, initial_params, beta, zeta, momentum, factored=True)


def amos_style_recipe(learning_rate: float = 0.01, *, num_steps: int, initial_params: Any,
                      direction: str = "adam", half_life: int = 1000,
                      kind: str = "inverse_square", q: float = 1.0, warmup_steps: int = 0,
                      b1: float = 0.9, b2: float = 0.98) -> optax.GradientTransformation:
    """The Amos-style chain (kexue.fm/archives/9344) over the `direction` ("adam",
    "factored" or "sign"), with σ of each tensor read off its initial values; `b1`, `b2`
    configure the Adam direction."""
    del num_steps
    direction_kwargs = {"b1": b1, "b2": b2} if direction == "adam" else {}
    return amos_style(learning_rate, direction=direction,
                      sigma_fn=eta_fn_from_init(initial_params), half_life=half_life,
                      kind=kind, q=q, warmup_steps=warmup_steps,
                      direction_kwargs=direction_kwargs)


#: name -> recipe. `amos_factored` takes the settings of `amos`.
RECIPES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": adamw_recipe,
    "amos": amos_recipe,
    "amos_factored": amos_factored_recipe,
    "amos_style": amos_style_recipe,
}
OPTIMIZERS = tuple(RECIPES)


def optimizer_defaults(name: str) -> dict[str, Any]:
    """The settings recipe `name` takes, each at its default."""
    _check_choice("name", name, OPTIMIZERS)
    return {key: parameter.default
            for key, parameter in inspect.signature(RECIPES[name]).parameters.items()
            if key not in _SUPPLIED and parameter.default is not inspect.Parameter.empty}


def _constant_rate(settings: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    del num_steps
    return optax.constant_schedule(settings["learning_rate"])


#: name -> `(settings with defaults, num_steps) -> schedule` of the global rate.
_RATES: dict[str, Callable[[Mapping[str, Any], int], optax.Schedule]] = {
    "adamw": lambda s, num_steps: _adamw_rate(s["learning_rate"], num_steps,
                                              s["warmup_steps"], s["schedule"]),
    "amos": _constant_rate,
    "amos_factored": _constant_rate,
    "amos_style": lambda s, num_steps: amos_decay_schedule(
        s["kind"], half_life=s["half_life"], warmup_steps=s["warmup_steps"],
        init_value=s["learning_rate"]),
}


def learning_rate_schedule(name: str, settings: Mapping[str, Any] | None = None, *,
                           num_steps: int) -> optax.Schedule:
    """The global learning rate of optimizer `name`, by update count (0: the first update).

    AdamW: the warm-up and cosine (or constant) schedule its recipe builds, `η_t`.
    Amos and factored Amos: the global rate `ξ` (`learning_rate`), constant; each
    tensor's own step `ξ η / (1 + ζ √α b)` then decays through its `b` slot, so no single
    number is the step size (`kexue.train` logs the relative update `‖Δθ‖ / ‖θ‖` for
    that). Amos-style: `α₀ · decay(t) · warmup(t)` (`amos_decay_schedule`), the factor
    that scales both the normalised update and the weight decay (archive 9344).

    Raises:
      ValueError: an unknown name or setting, as `make_optimizer`.
    """
    defaults = optimizer_defaults(name)
    unknown = sorted(set(settings or {}) - set(defaults))
    if unknown:
        raise ValueError(f"`settings` of optimizer {name!r}: unknown {unknown}; expected "
                         f"keys among {sorted(defaults)}")
    return _RATES[name]({**defaults, **(settings or {})}, num_steps)


def make_optimizer(name: str, settings: Mapping[str, Any] | None = None, *, num_steps: int,
                   initial_params: Any = None,
                   clip_norm: float = 0.0) -> optax.GradientTransformation:
    """The optimizer `name` with `settings` (missing keys take the recipe's defaults).

    Args:
      name: one of `OPTIMIZERS`.
      settings: keyword settings of the recipe (see `optimizer_defaults(name)`).
      num_steps: steps of the run (schedules end there).
      initial_params: the parameters at initialisation (Amos and Amos-style read each
        tensor's scale off them); may be None for AdamW.
      clip_norm: clip the gradient's global norm to this value first (0: off).

    Raises:
      ValueError: an unknown name or setting (naming it and the known ones), a
        non-finite or negative `clip_norm`, missing `initial_params` for Amos.
    """
    defaults = optimizer_defaults(name)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"`settings` of optimizer {name!r}: unknown {unknown}; expected "
                         f"keys among {sorted(defaults)}")
    if name != "adamw" and initial_params is None:
        raise ValueError(f"`initial_params`: optimizer {name!r} reads each tensor's scale "
                         "off its initial values; got None")
    check_number("clip_norm", clip_norm, strict=False)
    tx = RECIPES[name](**settings, num_steps=num_steps, initial_params=initial_params)
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm > 0 else tx
