"""Rotary position embedding (RoPE), 1-D and N-D.

RoPE (kexue.fm/archives/8265) encodes position `m` by rotating each feature pair of a
query or key vector by the angle `m·θ_i`, with `θ_i = base^(-2i/r)` for pair `i` of the
`r` rotary features. Since a rotation by `m` followed by the inverse of a rotation by
`n` is a rotation by `m − n`, attention scores `⟨R_m q, R_n k⟩ = ⟨q, R_{n−m} k⟩`
depend on positions only through their difference, and `‖R_m x‖ = ‖x‖`.

Two pairings of the features are in use and both are provided (`layout`):

* ``"interleaved"`` pairs `(x[2i], x[2i+1])`: RoFormer, bert4keras, HF RoFormer.
* ``"half"`` pairs `(x[i], x[i + r/2])`: GPT-NeoX, LLaMA ("rotate half").

Only the first `rotary_dim` features rotate ("partial rotary"); the rest pass through.

Layout of `x`: by default `[..., n, h, d]` (sequence, heads, features: the layout of
`dot_product_attention`); `seq_axis` names the sequence axis otherwise, e.g.
`seq_axis=-2` for `[..., n, d]` or a heads-first `[b, h, n, d]`. Every axis between the
sequence axis and the features shares the angle of its position. A `[b, h, n, d]`
input with the default `seq_axis=-3` would be rotated by head index, and the shape
cannot tell the two apart: pass `seq_axis` for any layout other than `[..., n, h, d]`.

Positions may be integers or floats (equal-mean random positions, archive 9444).
Angles, sines and cosines are always computed in at least float32; the output has the
dtype of `x`. Everything is elementwise (no gathers), so under `jax.jit` XLA fuses the
whole rotation into a single loop over `x`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops import _checks

LAYOUTS = ("interleaved", "half")


def _check_rotary_dim(name: str, rotary_dim, multiple: int = 2) -> None:
    """`rotary_dim` must be a positive Python int divisible by `multiple`."""
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int | np.integer):
        raise ValueError(f"`{name}` must be a Python int; got {rotary_dim!r}.")
    if rotary_dim <= 0 or rotary_dim % multiple:
        raise ValueError(
            f"`{name}` must be a positive multiple of {multiple}; got {rotary_dim}."
        )


def _check_base(base) -> None:
    if not (isinstance(base, int | float | np.number) and math.isfinite(base) and base > 1):
        raise ValueError(f"`base` must be a finite number greater than 1; got {base!r}.")


def rope_frequencies(rotary_dim: int, base: float = 10000.0) -> jax.Array:
    """Rotation frequencies `θ_i = base^(-2i / rotary_dim)`, `i = 0 … rotary_dim/2 − 1`.

    The geometric spectrum of RoPE (kexue.fm/archives/8265): pair 0 turns by one radian
    per position, the last pair by about `1/base` radian.

    Args:
      rotary_dim: number of rotating features `r` (even, positive).
      base: the frequency base (10000 in RoFormer and most LLMs).

    Returns:
      float32 array of shape `[rotary_dim // 2]`. The values are computed in float64 on
      the host and rounded once, so they are constants under `jax.jit`.
    """
    return jnp.asarray(_frequencies64(rotary_dim, base), dtype=jnp.float32)


def _frequencies64(rotary_dim: int, base: float) -> np.ndarray:
    _check_rotary_dim("rotary_dim", rotary_dim)
    _check_base(base)
    exponents = np.arange(rotary_dim // 2, dtype=np.float64) * (-2.0 / rotary_dim)
    return np.power(float(base), exponents)


# Largest sin/cos table (entries of each) computed on the host for host positions.
_MAX_HOST_TABLE = 1 << 22


def _is_host_value(positions) -> bool:
    """True for positions known at trace time (NumPy arrays, lists, ranges)."""
    return isinstance(positions, np.ndarray | list | tuple | range | int | float | np.number)


def _sin_cos_from_angles(positions, theta64: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """sin and cos of `positions[..., None] * theta`, broadcast over the last axis.

    Host positions (known at trace time, e.g. the default `arange(n)`) give a table
    computed in float64 with NumPy and embedded as a constant: exact angles even for
    large positions, and under `jax.jit` nothing is recomputed. Traced positions are
    computed on the device by `_device_sin_cos`, once per table entry.
    """
    dtype = _angle_dtype(positions)
    if _is_host_value(positions):
        host = np.asarray(positions)
        if host.size * theta64.size <= _MAX_HOST_TABLE:
            angles = host.astype(np.float64)[..., None] * theta64
            return (jnp.asarray(np.sin(angles), dtype=dtype),
                    jnp.asarray(np.cos(angles), dtype=dtype))
    angles = jnp.asarray(positions).astype(dtype)[..., None] * theta64.astype(dtype)
    return _device_sin_cos(angles)


#: Taylor coefficients of `tan u = Σ c_k u^(2k+1)`; 7 terms are within 3e-9 (relative)
#: on `|u| ≤ π/8`.
_TAN_TAYLOR = (1.0, 1 / 3, 2 / 15, 17 / 315, 62 / 2835, 1382 / 155925, 21844 / 6081075)


def _cody_waite_split(value: float, bits: int = 8) -> tuple[float, float, float]:
    """`value = hi + mid + lo` with `hi`, `mid` of `bits` significant bits, so that `k·hi`
    and `k·mid` are exact in float32 for integers `|k| < 2^(24 − bits)`."""
    parts = []
    rest = value
    for _ in range(2):
        mantissa, exponent = math.frexp(rest)
        part = math.ldexp(math.floor(math.ldexp(mantissa, bits)), exponent - bits)
        parts.append(part)
        rest -= part
    return parts[0], parts[1], float(np.float32(rest))


_HALF_PI_PARTS = _cody_waite_split(math.pi / 2)


def _device_sin_cos(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin and cos of traced `angles`, computed once per table entry.

    XLA:CPU counts `sin`/`cos` as cheap, fuses them into the rotation loop and evaluates
    them for every batch element and head, with a scalar routine that costs ~10x the
    rotation itself; RoPE then runs at a fraction of copy bandwidth. Here float32 angles
    go through vectorisable arithmetic that ends in a division, which XLA:CPU counts as
    expensive and does not fuse into a consumer that reads each element many times, so
    the table is computed once and read by the loop (`python -m benchmarks.ops`):

    1. quadrant `k = round(a / (π/2))` and `r = a − k·π/2 ∈ [−π/4, π/4]` (π/2 split in
       three parts, Cody–Waite, so `k·π/2` is exact for `|a| < 10⁵`; beyond that its
       error stays below the rounding of the float32 angle itself);
    2. `t = tan(r/2)` from its Taylor series (`|r/2| ≤ π/8`);
    3. `sin r = 2t/(1 + t²)`, `cos r = (1 − t²)/(1 + t²)` (Weierstrass), rotated by the
       quadrant: `(sin a, cos a) = (sin r, cos r)·i^k` — the division comes last.

    Within 2e-7 of `sin`/`cos` of the float32 angle for `|a| < 10⁵`. float64 angles use
    `jnp.sin`/`jnp.cos`.
    """
    if angles.dtype == jnp.float64:
        return jnp.sin(angles), jnp.cos(angles)
    dtype = angles.dtype
    quadrant = jnp.round(angles * np.asarray(2 / math.pi, dtype))
    reduced = angles
    for part in _HALF_PI_PARTS:
        reduced = reduced - quadrant * np.asarray(part, dtype)
    half = reduced * 0.5
    square = half * half
    tan_half = jnp.full_like(half, _TAN_TAYLOR[-1])
    for coefficient in _TAN_TAYLOR[-2::-1]:
        tan_half = tan_half * square + np.asarray(coefficient, dtype)
    tan_half = tan_half * half
    sin_r = 2 * tan_half
    cos_r = 1 - tan_half * tan_half
    k = quadrant.astype(jnp.int32)
    odd = (k & 1) == 1
    sin_sign = jnp.where((k & 2) == 2, -1.0, 1.0).astype(dtype)
    cos_sign = jnp.where(((k + 1) & 2) == 2, -1.0, 1.0).astype(dtype)
    denominator = 1 + tan_half * tan_half
    sin = sin_sign * jnp.where(odd, cos_r, sin_r) / denominator
    cos = cos_sign * jnp.where(odd, sin_r, cos_r) / denominator
    return sin, cos


def _angle_dtype(positions) -> jnp.dtype:
    """float32 for integer/float32/bf16 positions, float64 for float64 positions."""
    dtype = jnp.result_type(positions if hasattr(positions, "dtype") else np.asarray(positions))
    return _checks.compute_dtype(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32)


def rope_sin_cos(positions, rotary_dim: int, *,
                 base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Sines and cosines of the RoPE angles `m·θ_i`, for caching across layers or steps.

    `θ_i = base^(-2i/rotary_dim)` (kexue.fm/archives/8265). Models that apply RoPE in
    every layer can compute this once and pass it to `apply_rope(x, sin_cos=...)`.

    Args:
      positions: `[..., n]` integer or float positions `m` (floats are allowed: see
        equal-mean random positions, kexue.fm/archives/9444).
      rotary_dim: number of rotating features `r` (even, positive).
      base: the frequency base.

    Returns:
      `(sin, cos)`, each of shape `[..., n, rotary_dim // 2]` and dtype float32
      (float64 if `positions` is float64).
    """
    _checks.check_dtype_kind("positions", positions, ("integer", "floating"))
    return _sin_cos_from_angles(positions, _frequencies64(rotary_dim, base))


def _rotate_pairs(x: jax.Array, sin: jax.Array, cos: jax.Array, layout: str) -> jax.Array:
    """Rotate the feature pairs on the last axis of `x` (size `2p`) by angles with `sin`, `cos`.

    `sin`/`cos` broadcast against `x.shape[:-1] + (p,)`. For each pair `(a, b)`:
    `(a, b) ↦ (a cos − b sin, a sin + b cos)`. Slices, arithmetic and one concatenate
    only, so XLA emits a single fused loop.
    """
    p = x.shape[-1] // 2
    if layout == "interleaved":
        pairs = x.reshape((*x.shape[:-1], p, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
        return rotated.reshape(x.shape)
    halves = x.reshape((*x.shape[:-1], 2, p))
    a, b = halves[..., 0, :], halves[..., 1, :]
    # Stacking on a new axis (not concatenating the halves) lets XLA fuse the whole
    # rotation into one loop, as for the interleaved layout.
    rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-2)
    return rotated.reshape(x.shape)


def _rotate_features(x: jax.Array, sin: jax.Array, cos: jax.Array, layout: str,
                     rotary_dim: int, parts: int) -> jax.Array:
    """Rotate the first `rotary_dim` features of `x [..., d]`; the rest pass through.

    The rotary features are viewed as `parts` contiguous blocks of size
    `rotary_dim / parts`, each paired within itself according to `layout`; `sin`/`cos`
    broadcast against `x.shape[:-1] + (parts, rotary_dim / (2 parts))`.
    """
    compute = _checks.compute_dtype(x.dtype)
    x_rot = x[..., :rotary_dim].astype(compute)
    blocks = x_rot.reshape((*x_rot.shape[:-1], parts, rotary_dim // parts))
    rotated = _rotate_pairs(blocks, sin.astype(compute), cos.astype(compute), layout)
    rotated = rotated.reshape(x_rot.shape).astype(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)


def _check_seq_axis(x, seq_axis) -> int:
    """`seq_axis` as a negative index of `x`'s sequence axis (not the feature axis)."""
    rank = len(_checks.shape_of(x))
    if isinstance(seq_axis, bool) or not isinstance(seq_axis, int | np.integer):
        raise ValueError(f"`seq_axis` must be a Python int; got {seq_axis!r}.")
    if not (-rank <= seq_axis < rank and seq_axis % rank != rank - 1):
        raise ValueError(
            f"`seq_axis` must name an axis of `x` before its last (feature) axis, i.e. be in "
            f"[{-rank}, {rank - 2}] but not -1, for x with shape {_checks.shape_of(x)}; "
            f"got {seq_axis}."
        )
    return int(seq_axis) % rank - rank


def _per_position(table: jax.Array, seq_axis: int, trailing: int) -> jax.Array:
    """Insert the axes that share one angle: the `-seq_axis − 2` axes between the
    sequence and feature axes of `x`, before the `trailing` last axes of `table`."""
    inner = -seq_axis - 2
    split = table.ndim - trailing
    return table.reshape(table.shape[:split] + (1,) * inner + table.shape[split:])


def _resolve_rotary_dim(x, rotary_dim, multiple: int) -> int:
    d = x.shape[-1]
    if rotary_dim is None:
        rotary_dim = d
    _check_rotary_dim("rotary_dim", rotary_dim, multiple)
    if rotary_dim > d:
        raise ValueError(
            f"`rotary_dim` must be at most the head dim of `x`; got rotary_dim={rotary_dim} "
            f"for x with shape {tuple(x.shape)}."
        )
    return int(rotary_dim)


def apply_rope(x, positions=None, *, sin_cos: tuple[jax.Array, jax.Array] | None = None,
               base: float = 10000.0, layout: str = "interleaved",
               rotary_dim: int | None = None, seq_axis: int = -3) -> jax.Array:
    """Rotate queries or keys by their positions: `x_m ↦ R_m x_m` (kexue.fm/archives/8265).

    For pair `i` with frequency `θ_i = base^(-2i/r)` and features `(a, b)` of the pair:
    `(a, b) ↦ (a cos mθ_i − b sin mθ_i, a sin mθ_i + b cos mθ_i)`. Pairs are
    `(x[2i], x[2i+1])` for ``layout="interleaved"`` (RoFormer) and `(x[i], x[i+r/2])`
    for ``layout="half"`` (GPT-NeoX / LLaMA). Features from `rotary_dim` on pass through.

    Args:
      x: queries or keys, any float dtype: `[..., n, h, d]` by default, else with the
        sequence axis at `seq_axis` (e.g. `[b, h, n, d]` with `seq_axis=-2`).
      positions: `[..., n]` integer or float positions, broadcastable to
        `x.shape[:seq_axis + 1]` (`x.shape[:-2]` by default, so `[n]` serves any
        batch; for `[b, h, n, d]` pass `[n]` or `[b, 1, n]`). Defaults to `arange(n)`,
        `n = x.shape[seq_axis]`, when `sin_cos` is None too.
      sin_cos: optional `(sin, cos)` from `rope_sin_cos`, each `[..., n, rotary_dim/2]`
        with leading axes broadcastable to `x.shape[:seq_axis + 1]`; replaces
        `positions` and `base`.
      base: frequency base, used when the angles come from `positions`.
      layout: ``"interleaved"`` or ``"half"``.
      rotary_dim: number of rotating features `r` (even, at most `d`); None means `d`.
      seq_axis: the sequence axis of `x` (any axis but the last; default −3 for
        `[..., n, h, d]`). The axes between it and the features (the heads) share
        the angle of their position. Nothing in a shape says which axis is the
        sequence: a `[b, h, n, d]` input needs `seq_axis=-2`.

    Returns:
      Array with the shape and dtype of `x`. Angles, sines and cosines are float32 (or
      wider) whatever the dtype of `x`; the rotation itself is computed in at least
      float32 and rounded once to `x.dtype`.
    """
    _checks.check_min_rank("x", x, 3 if seq_axis == -3 else 2,
                           "[..., n, h, d]" if seq_axis == -3 else "[..., n, d]")
    seq_axis = _check_seq_axis(x, seq_axis)
    _checks.check_floating("x", x)
    _checks.check_one_of("layout", layout, LAYOUTS)
    x = jnp.asarray(x)
    rotary_dim = _resolve_rotary_dim(x, rotary_dim, 2)
    leading = tuple(x.shape[:x.ndim + seq_axis + 1])
    leading_name = "x.shape[:-2]" if seq_axis == -3 else "x.shape[:seq_axis + 1]"
    if sin_cos is not None:
        if positions is not None:
            raise ValueError("Pass either `positions` or `sin_cos` to `apply_rope`, not both.")
        if not (isinstance(sin_cos, tuple | list) and len(sin_cos) == 2):
            raise ValueError(
                "`sin_cos` must be the (sin, cos) pair returned by `rope_sin_cos`; "
                f"got {type(sin_cos).__name__}."
            )
        sin, cos = (jnp.asarray(t) for t in sin_cos)
        _checks.check_same_shape("sin", sin, "cos", cos)
        _checks.check_min_rank("sin_cos[0]", sin, 2, "[..., n, rotary_dim // 2]")
        _checks.check_dim("sin_cos[0]", sin, -1, rotary_dim // 2, "rotary_dim // 2")
        _checks.check_broadcasts_to("sin_cos[0].shape[:-1]", sin.shape[:-1],
                                    leading_name, leading)
    else:
        if positions is None:
            positions = np.arange(x.shape[seq_axis], dtype=np.int32)
        _checks.check_broadcasts_to("positions", _checks.shape_of(positions),
                                    leading_name, leading)
        sin, cos = rope_sin_cos(positions, rotary_dim, base=base)
    # [..., n, r/2] -> [..., n, 1 (each axis up to the features), 1 (parts), r/2]
    sin, cos = (_per_position(t[..., None, :], seq_axis, 2) for t in (sin, cos))
    return _rotate_features(x, sin, cos, layout, rotary_dim, parts=1)


def apply_rope_nd(x, positions, *, base: float = 10000.0, layout: str = "interleaved",
                  rotary_dim: int | None = None, seq_axis: int = -3) -> jax.Array:
    """N-dimensional RoPE: block-diagonal rotation, one block per position axis.

    With `k` position axes (e.g. `(row, col)` of image patches, k = 2), the `r` rotary
    features are split into `k` contiguous parts of size `r/k`; part `j` is rotated by
    1-D RoPE at position `p_j` with its own frequencies `θ_i = base^(-2i/(r/k))` and the
    pairing of `layout` inside the part (kexue.fm/archives/8397). Relativity holds per
    axis: `R_{p}ᵀ R_{p'} = R_{p' − p}`, and the map is orthogonal (lossless). With
    `k = 1` this is `apply_rope`.

    Args:
      x: queries or keys, any float dtype: `[..., n, h, d]` by default, else with the
        sequence axis at `seq_axis` (as in `apply_rope`).
      positions: `[..., n, k]` integer or float positions; `positions.shape[:-1]` must
        broadcast to `x.shape[:seq_axis + 1]` (`x.shape[:-2]` by default).
      base: frequency base.
      layout: ``"interleaved"`` or ``"half"`` (pairing inside each part).
      rotary_dim: number of rotating features (divisible by `2k`, at most `d`); None
        means `d`. Features from `rotary_dim` on pass through.
      seq_axis: the sequence axis of `x`, as in `apply_rope` (default −3).

    Returns:
      Array with the shape and dtype of `x` (angles and rotation in at least float32).
    """
    _checks.check_min_rank("x", x, 3 if seq_axis == -3 else 2,
                           "[..., n, h, d]" if seq_axis == -3 else "[..., n, d]")
    seq_axis = _check_seq_axis(x, seq_axis)
    _checks.check_floating("x", x)
    _checks.check_one_of("layout", layout, LAYOUTS)
    _checks.check_min_rank("positions", positions, 2, "[..., n, k]")
    _checks.check_dtype_kind("positions", positions, ("integer", "floating"))
    x = jnp.asarray(x)
    if not _is_host_value(positions):
        positions = jnp.asarray(positions)
    positions_shape = _checks.shape_of(positions)
    k = positions_shape[-1]
    if k < 1:
        raise ValueError(f"`positions` must have at least one axis of positions (last axis "
                         f"k >= 1); got shape {positions_shape}.")
    if rotary_dim is None and x.shape[-1] % (2 * k):
        raise ValueError(
            f"The head dim of `x` (shape {tuple(x.shape)}) must be divisible by 2k = {2 * k} "
            f"for positions with shape {positions_shape}; or pass a `rotary_dim` that is."
        )
    rotary_dim = _resolve_rotary_dim(x, rotary_dim, 2 * k)
    _checks.check_broadcasts_to("positions.shape[:-1]", positions_shape[:-1],
                                "x.shape[:-2]" if seq_axis == -3 else "x.shape[:seq_axis + 1]",
                                tuple(x.shape[:x.ndim + seq_axis + 1]))
    sin, cos = _sin_cos_from_angles(positions, _frequencies64(rotary_dim // k, base))
    # [..., n, k, part/2] -> [..., n, 1 (each axis up to the features), k, part/2]
    sin, cos = (_per_position(t, seq_axis, 2) for t in (sin, cos))
    return _rotate_features(x, sin, cos, layout, rotary_dim, parts=k)
