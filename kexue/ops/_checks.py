"""Boundary checks and dtype helpers shared by every op in `kexue.ops`, and the
number checks every kexue package uses for its settings.

Every check raises a `ValueError` whose message names the argument, what was
expected and what arrived ("`name`: expected …; got …"), so a researcher sees the
problem without a stack dive. Checks read only static shapes, dtypes and Python
numbers, so they are free under `jax.jit`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def shape_of(x) -> tuple[int, ...]:
    """Static shape of an array-like (works on tracers, NumPy arrays and lists)."""
    return tuple(np.shape(x))


def check_min_rank(name: str, x, min_rank: int, layout: str = "") -> None:
    """Raise if `x` has fewer than `min_rank` axes."""
    shape = shape_of(x)
    if len(shape) < min_rank:
        hint = f" ({layout})" if layout else ""
        raise ValueError(
            f"`{name}` must have at least {min_rank} axes{hint}; got shape {shape}."
        )


def check_rank(name: str, x, rank: int, layout: str = "") -> None:
    """Raise if `x` does not have exactly `rank` axes."""
    shape = shape_of(x)
    if len(shape) != rank:
        hint = f" ({layout})" if layout else ""
        raise ValueError(f"`{name}` must have {rank} axes{hint}; got shape {shape}.")


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
    """Raise if `a` and `b` differ in shape."""
    sa, sb = shape_of(a), shape_of(b)
    if sa != sb:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape; "
            f"got {name_a}.shape={sa} and {name_b}.shape={sb}."
        )


def check_dim(name: str, x, axis: int, expected: int, what: str = "") -> None:
    """Raise if `x.shape[axis] != expected`."""
    shape = shape_of(x)
    got = shape[axis]
    if got != expected:
        detail = f" ({what})" if what else ""
        raise ValueError(
            f"`{name}` must have size {expected} on axis {axis}{detail}; "
            f"got shape {shape}."
        )


def check_broadcastable(name_a: str, a_shape: Sequence[int], name_b: str,
                        b_shape: Sequence[int]) -> tuple[int, ...]:
    """Return the broadcast shape, or raise naming both arguments."""
    try:
        return tuple(np.broadcast_shapes(tuple(a_shape), tuple(b_shape)))
    except ValueError:
        raise ValueError(
            f"`{name_a}` with shape {tuple(a_shape)} does not broadcast against "
            f"`{name_b}` with shape {tuple(b_shape)}."
        ) from None


def check_one_of(name: str, value, allowed: Sequence) -> None:
    """Raise if `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}; got {value!r}.")


def check_positive(name: str, value) -> None:
    """Raise if a static Python number is not strictly positive."""
    if not value > 0:
        raise ValueError(f"`{name}` must be positive; got {value!r}.")


def check_int(name: str, value, *, least: int = 1) -> int:
    """`value` as an int if it is an integer (not a bool) `>= least`, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"`{name}`: expected an int >= {least}; got {value!r}")
    return int(value)


def check_number(name: str, value, *, least: float = 0.0, strict: bool = True,
                 below: float | None = None) -> float:
    """`value` as a float if it is a finite real number (not a bool) above `least`
    (`> least` when `strict`, else `>=`) and, with `below`, under it; else raise."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    ok = ok and math.isfinite(value) and (value > least if strict else value >= least)
    ok = ok and (below is None or value < below)
    if not ok:
        bound = f"{'>' if strict else '>='} {least:g}"
        if below is not None:
            bound += f" and < {below:g}"
        raise ValueError(f"`{name}`: expected a finite number {bound}; got {value!r}")
    return float(value)


def check_floating(name: str, x) -> None:
    """Raise if `x` is not a floating-point array."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating-point array; got dtype {dtype}.")


def compute_dtype(dtype) -> jnp.dtype:
    """Dtype to accumulate in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def large_negative(dtype) -> float:
    """A finite, very negative logit for masking entries of `dtype`.

    Large enough that `exp(large_negative - typical_logit)` underflows to exactly 0
    in float32/bfloat16/float16, yet far enough from `finfo.min` that adding a few
    ordinary logits or subtracting a row max cannot overflow to `-inf`/NaN.
    """
    info = jnp.finfo(dtype)
    return float(-0.7 * float(info.max)) if info.bits <= 16 else -1e12


def check_broadcasts_to(name: str, shape: Sequence[int], target_name: str,
                        target_shape: Sequence[int]) -> None:
    """Raise unless `shape` broadcasts to exactly `target_shape` (one-way broadcasting)."""
    shape, target_shape = tuple(shape), tuple(target_shape)
    try:
        ok = tuple(np.broadcast_shapes(shape, target_shape)) == target_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`{name}` with shape {shape} does not broadcast to `{target_name}` "
            f"with shape {target_shape}."
        )


def check_dtype_kind(name: str, x, kinds: Sequence[str]) -> None:
    """Raise unless the dtype of `x` is one of `kinds` ("bool", "integer", "floating")."""
    if hasattr(x, "dtype"):
        dtype = x.dtype
    else:
        try:
            dtype = jnp.asarray(x).dtype
        except (TypeError, ValueError) as error:
            raise ValueError(f"`{name}` must be an array with a {' or '.join(kinds)} dtype; "
                             f"got {type(x).__name__}: {error}") from error
    groups = {"bool": jnp.bool_, "integer": jnp.integer, "floating": jnp.floating}
    if not any(jnp.issubdtype(dtype, groups[kind]) for kind in kinds):
        raise ValueError(f"`{name}` must have a {' or '.join(kinds)} dtype; got dtype {dtype}.")


def check_values_in_unit_interval(name: str, x) -> None:
    """Raise if a concrete `x` has entries outside `[0, 1]` (or NaN).

    Only values known outside `jax.jit` can be checked; under tracing this is a no-op,
    so the check costs nothing in compiled code.
    """
    if isinstance(x, jax.core.Tracer):
        return
    values = np.asarray(x)
    if values.size == 0 or values.dtype == np.bool_:
        return
    low, high = values.min(), values.max()
    if not (low >= 0 and high <= 1):  # also catches NaN
        raise ValueError(
            f"`{name}` must lie in [0, 1] (probabilities or 0/1 labels); got values in "
            f"[{low}, {high}] for an array of shape {values.shape}."
        )
