"""Optax transformations: Amos (arXiv 2210.11693) and Amos-style schedules (kexue.fm 9344).

    from kexue import optim
    tx = optim.amos(0.02, optim.eta_fn_from_init(params))
    tx = optim.amos(0.02, optim.eta_fn_from_init(params), optim.reduce_largest_axes())
    tx = optim.amos_style(1e-2, direction="adam", sigma_fn=optim.eta_fn_from_init(params),
                          half_life=10_000)

Named optimizers from plain arguments, with their defaults in one place:
`make_optimizer(name, settings, num_steps=..., initial_params=...)`,
`optimizer_defaults(name)`, `learning_rate_schedule(name, settings, num_steps=...)`.

Per-tensor hyper-parameters (`η`/`σ`, slot shapes) are rules of the parameter path
and shape: `eta_fn_from_init`, `eta_fn_from_rules`, `shape_fn_from_rules`,
`reduce_largest_axes`; `parameter_paths(params)` lists the paths rules see.
"""

from kexue.optim.amos import (
    AMOS_EPSILON,
    CPU_COMPILER_OPTIONS,
    ScaleByAmosState,
    amos,
    scale_by_amos,
)
from kexue.optim.amos_style import (
    DecoupledWeightDecayState,
    amos_style,
    amos_style_weight_decay,
    decoupled_weight_decay,
    normalize_updates,
)
from kexue.optim.recipes import (
    OPTIMIZERS,
    learning_rate_schedule,
    make_optimizer,
    optimizer_defaults,
)
from kexue.optim.rules import (
    eta_fn_from_init,
    eta_fn_from_rules,
    parameter_path,
    parameter_paths,
    reduce_largest_axes,
    shape_fn_from_rules,
)
from kexue.optim.schedules import amos_decay_schedule

__all__ = [
    "AMOS_EPSILON",
    "CPU_COMPILER_OPTIONS",
    "OPTIMIZERS",
    "DecoupledWeightDecayState",
    "ScaleByAmosState",
    "amos",
    "amos_decay_schedule",
    "amos_style",
    "amos_style_weight_decay",
    "decoupled_weight_decay",
    "eta_fn_from_init",
    "eta_fn_from_rules",
    "learning_rate_schedule",
    "make_optimizer",
    "normalize_updates",
    "optimizer_defaults",
    "parameter_path",
    "parameter_paths",
    "reduce_largest_axes",
    "scale_by_amos",
    "shape_fn_from_rules",
]
