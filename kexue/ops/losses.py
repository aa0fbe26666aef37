"""Multi-label losses: ZLPR (dense, soft, sparse) and symmetric KL for logits.

ZLPR (kexue.fm/archives/7359, 9064) extends "softmax + cross-entropy" to multi-label
classification: with scores `s` and the target set split into positives and negatives,

    loss = log(1 + Σ_{neg} e^{s_i}) + log(1 + Σ_{pos} e^{−s_j}),

which pushes every positive score above 0 and every negative score below 0 (decode: a
class is on iff `s > 0`), without a number of labels to choose. It is the loss of
GlobalPointer (`kexue.ops.global_pointer`), whose logits are flattened span scores.

All losses compute in at least float32 and return float32 (float64 for float64 inputs).
An optional bool `where` (as in optax) selects the entries that count: the others
contribute nothing, and values and gradients stay finite even when no entry of a row
is selected.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops import _checks

__all__ = ["global_pointer_kl", "softmax_kl", "sparse_zlpr_loss", "zlpr_loss"]

Axis = int | Sequence[int]


def _normalize_axis(axis: Axis, rank: int, name: str = "axis") -> tuple[int, ...]:
    """Distinct non-negative axes from an int or a sequence of ints, or raise."""
    try:
        axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    except TypeError:
        axes = ()
    if not axes or not all(isinstance(a, int | np.integer) and not isinstance(a, bool)
                           for a in axes):
        raise ValueError(f"`{name}` must be an int or a non-empty sequence of ints; got {axis!r}.")
    if any(not -rank <= a < rank for a in axes):
        raise ValueError(f"`{name}`={axis!r} is out of range for an array with {rank} axes.")
    normalized = tuple(sorted(int(a) % rank for a in axes))
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"`{name}` must not repeat an axis; got {axis!r}.")
    return normalized


def _prepare_where(where, target_shape: tuple[int, ...], target_name: str):
    """Check a bool/integer `where` broadcasting to `target_shape`; return it as bool."""
    if where is None:
        return None
    _checks.check_dtype_kind("where", where, ("bool", "integer"))
    _checks.check_broadcasts_to("where", _checks.shape_of(where), target_name, target_shape)
    return jnp.broadcast_to(jnp.asarray(where).astype(bool), target_shape)


def _log1p_sum_exp(a: jax.Array, keep: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    """`log(1 + Σ_{keep} e^{a})` over `axes`, i.e. a logsumexp with an appended 0 logit.

    Dropped entries are replaced by a finite large negative logit, so they get exactly
    zero weight and zero gradient, and an all-dropped row gives `log 1 = 0`.
    """
    if keep is not None:
        a = jnp.where(keep, a, _checks.large_negative(a.dtype))
    return jax.nn.softplus(jax.nn.logsumexp(a, axis=axes))


def zlpr_loss(logits, labels, *, where=None, axis: Axis = -1) -> jax.Array:
    """ZLPR multi-label loss with hard (0/1) or soft (in [0, 1]) labels.

    kexue.fm/archives/7359 (hard) and 9064 (soft):
    `log(1 + Σ_i (1 − t_i) e^{s_i}) + log(1 + Σ_i t_i e^{−s_i})` with `t = labels`, which
    for 0/1 labels is
    `log(1 + Σ_{neg} e^{s}) + log(1 + Σ_{pos} e^{−s})`. Each part is a logsumexp of
    `s + log(1 − t)` (resp. `−s + log t`) with a zero logit appended; entries whose
    weight `1 − t` (resp. `t`) is 0 are left out instead of taking `log 0`; their
    derivative in the labels is still the closed form's,
    `∂L/∂t_i = −e^{s_i} / (1 + Σ (1 − t) e^{s}) + e^{−s_i} / (1 + Σ t e^{−s})`, at
    `t_i = 0` and `t_i = 1` too (distillation with soft labels).

    Args:
      logits: `[...]` float scores `s` (e.g. GlobalPointer logits `[..., types, n, n]`).
      labels: same shape as `logits`; bool, integer 0/1 or float in `[0, 1]`
        (concrete labels outside `[0, 1]` raise `ValueError`; traced ones cannot be
        checked).
      where: optional bool/integer array broadcastable to `logits.shape`; False entries
        contribute nothing (no value, no gradient).
      axis: axis or axes reduced over (the classes), e.g. `(-2, -1)` per GlobalPointer
        type or `(-3, -2, -1)` per example.

    Returns:
      Per-example loss with the `axis` axes removed, float32 (float64 for float64 input).
    """
    _checks.check_floating("logits", logits)
    _checks.check_dtype_kind("labels", labels, ("bool", "integer", "floating"))
    _checks.check_same_shape("logits", logits, "labels", labels)
    _checks.check_values_in_unit_interval("labels", labels)
    shape = _checks.shape_of(logits)
    axes = _normalize_axis(axis, len(shape))
    keep = _prepare_where(where, shape, "logits")
    dtype = _checks.compute_dtype(jnp.result_type(logits))
    s = jnp.asarray(logits).astype(dtype)
    t = jnp.asarray(labels).astype(dtype)
    if keep is not None:
        s = jnp.where(keep, s, 0)
    w_neg, w_pos = 1 - t, t
    keep_neg, keep_pos = w_neg > 0, w_pos > 0
    if keep is not None:
        keep_neg, keep_pos = keep_neg & keep, keep_pos & keep
    a_neg = s + jnp.log(jnp.where(keep_neg, w_neg, 1))
    a_pos = -s + jnp.log(jnp.where(keep_pos, w_pos, 1))
    neg = _log1p_sum_exp(a_neg, keep_neg, axes)
    pos = _log1p_sum_exp(a_pos, keep_pos, axes)
    # An entry of weight 0 (t = 1 in the negative part, t = 0 in the positive part) is
    # left out of its sum, so autodiff would give it no derivative in t; the loss is
    # smooth there and its derivative in the weight is e^{±s} / (1 + Σ w e^{±s}).
    # `_zero_with_weight_tangent` adds that derivative and nothing else: its value is 0
    # and it has no derivative in `s`.
    dropped_neg, dropped_pos = ~keep_neg, ~keep_pos
    if keep is not None:
        dropped_neg, dropped_pos = dropped_neg & keep, dropped_pos & keep
    slope_neg = _weight_slope(s, neg, dropped_neg, axes)
    slope_pos = _weight_slope(-s, pos, dropped_pos, axes)
    return (neg + pos + _zero_with_weight_tangent(w_neg, slope_neg, axes)
            + _zero_with_weight_tangent(w_pos, slope_pos, axes))


def _weight_slope(a: jax.Array, part: jax.Array, dropped: jax.Array,
                  axes: tuple[int, ...]) -> jax.Array:
    """`∂/∂w_i log(1 + Σ w e^{a}) = e^{a_i − part}` on the `dropped` entries, else 0.

    `part` is the value of the log (the `axes` reduced away). Clipped to the largest
    finite number of the dtype, so the slope of an overflowing entry is finite.
    """
    slope = jnp.exp(a - jnp.expand_dims(part, axes))
    slope = jnp.minimum(slope, jnp.finfo(slope.dtype).max)
    return jnp.where(dropped, slope, 0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _zero_with_weight_tangent(weight: jax.Array, slope: jax.Array,
                              axes: tuple[int, ...]) -> jax.Array:
    """Zeros of `weight`'s shape with `axes` removed, with derivative `slope` in `weight`.

    The tangent is `Σ_axes slope · dweight`; `slope` itself is treated as a constant.
    Since the value does not depend on `slope`, XLA drops its computation when only
    the value or the derivative in other arguments is used.
    """
    shape = tuple(n for i, n in enumerate(weight.shape) if i not in axes)
    return jnp.zeros(shape, weight.dtype)


@_zero_with_weight_tangent.defjvp
def _zero_with_weight_tangent_jvp(axes, primals, tangents):
    weight, slope = primals
    dweight, _ = tangents
    zero = _zero_with_weight_tangent(weight, slope, axes)
    return zero, jnp.sum(dweight * jax.lax.stop_gradient(slope), axis=axes)


def sparse_zlpr_loss(logits, labels, *, where=None) -> jax.Array:
    """ZLPR loss with the positives given as class indices (no dense label tensor).

    kexue.fm/archives/7359, 8373: equals `zlpr_loss(logits, dense, where=where)` with
    `dense[..., c] = 1` for every listed `c`, but reads only the `P` positive scores:

      pos = log(1 + Σ_{pos} e^{−s}),
      neg = log(1 + Σ_{neg} e^{s}).

    The direct form writes `neg` as `all + log(1 − e^{logsumexp(s_pos) − all})` with
    `all = log(1 + Σ_{all} e^{s})`. That subtraction cancels catastrophically once the
    positives dominate, which a trained model reaches (in float32 it returns garbage
    when `logsumexp(s_pos)` exceeds `log(1 + Σ_{neg} e^s)` by about 16, and its clipped
    form then pushes confident positives down). Here the same `neg` is computed
    without cancellation: the `P` positive scores are shifted to a large negative
    value by a scatter-add into the (already needed) compute copy of the scores, and
    the log-sum-exp runs over what remains. Exact for any scores; memory is one
    logits-sized buffer and a `[..., P]` index array, never a dense label tensor.
    For GlobalPointer, flatten the logits `[..., types, n, n]` to `[..., types·n²]`
    and the indices `type·n² + start·n + end` of `kexue.ops.spans_to_flat`.

    Args:
      logits: `[..., C]` float scores.
      labels: integer `[..., P]` class indices of the positives, leading axes
        broadcastable to `logits.shape[:-1]`. Indices outside `[0, C)` (use −1) are
        padding and ignored; a repeated index counts once, as in the dense form.
      where: optional bool/integer array broadcastable to `logits.shape`; False classes
        contribute nothing, also when listed as positives.

    Returns:
      `[...]` per-example loss, float32 (float64 for float64 input).
    """
    _checks.check_min_rank("logits", logits, 1, "[..., C]")
    _checks.check_floating("logits", logits)
    _checks.check_min_rank("labels", labels, 1, "[..., P]")
    _checks.check_dtype_kind("labels", labels, ("integer",))
    shape = _checks.shape_of(logits)
    idx_shape = _checks.shape_of(labels)
    _checks.check_broadcasts_to("labels.shape[:-1]", idx_shape[:-1],
                                "logits.shape[:-1]", shape[:-1])
    keep = _prepare_where(where, shape, "logits")
    num_classes = shape[-1]
    dtype = _checks.compute_dtype(jnp.result_type(logits))
    neg_inf = _checks.large_negative(dtype)
    s = jnp.asarray(logits).astype(dtype)
    if keep is not None:
        s = jnp.where(keep, s, neg_inf)

    # Sort so padding (-1) comes first and repeats are adjacent; keep each index once.
    idx = jnp.asarray(labels)
    idx = jnp.where((idx >= 0) & (idx < num_classes), idx, -1)
    idx = jnp.sort(jnp.broadcast_to(idx, shape[:-1] + idx_shape[-1:]), axis=-1)
    repeat = jnp.concatenate(
        [jnp.zeros_like(idx[..., :1], dtype=bool), idx[..., 1:] == idx[..., :-1]], axis=-1)
    is_pos = (idx >= 0) & ~repeat
    safe_idx = jnp.where(is_pos, idx, 0)
    if keep is not None:
        is_pos = is_pos & jnp.take_along_axis(keep, safe_idx, axis=-1)
    s_pos = jnp.where(is_pos, jnp.take_along_axis(s, safe_idx, axis=-1), 0)

    pos = _log1p_sum_exp(-s_pos, is_pos, (-1,))
    # Remove the positives from the negatives' sum: each listed index is unique after
    # the de-duplication above, so adding `neg_inf` once sends its e^s to exactly 0.
    rows = shape[:-1]
    flat_s = s.reshape(-1, num_classes)
    flat_idx = safe_idx.reshape(flat_s.shape[0], -1)
    shift = jnp.where(is_pos, neg_inf, 0).astype(dtype).reshape(flat_idx.shape)
    flat_s = flat_s.at[jnp.arange(flat_s.shape[0])[:, None], flat_idx].add(shift)
    neg = jax.nn.softplus(jax.nn.logsumexp(flat_s, axis=-1)).reshape(rows)
    return pos + neg


def global_pointer_kl(s, t, *, where=None, axis: Axis = -1) -> jax.Array:
    """Symmetric KL between two sets of multi-label (sigmoid) logits.

    kexue.fm/archives/9039: `D(s, t) = Σ_i (σ(s_i) − σ(t_i)) (s_i − t_i)` over the
    selected entries, which equals `Σ_i [KL(B_s‖B_t) + KL(B_t‖B_s)]` for the per-entry Bernoulli
    distributions `B_s = Bernoulli(σ(s_i))`. For R-Drop or virtual adversarial training
    on GlobalPointer / ZLPR logits. Non-negative, symmetric, zero iff `s = t` (selected).

    Args:
      s: float logits.
      t: float logits, same shape as `s`.
      where: optional bool/integer array broadcastable to `s.shape`; False entries are
        excluded (pass the GlobalPointer span validity, or rely on both logits carrying
        the same large negative value there, which gives 0).
      axis: axis or axes summed over.

    Returns:
      Divergence with the `axis` axes removed, float32 (float64 for float64 input).
    """
    s, t, keep, axes = _prepare_pair(s, t, where, axis)
    if keep is not None:
        s, t = jnp.where(keep, s, 0), jnp.where(keep, t, 0)
    terms = (jax.nn.sigmoid(s) - jax.nn.sigmoid(t)) * (s - t)
    return jnp.sum(terms, axis=axes)


def softmax_kl(s, t, *, where=None, axis: Axis = -1) -> jax.Array:
    """Symmetric KL between two categorical distributions given by logits.

    kexue.fm/archives/9039: `KL(p‖q) + KL(q‖p) = Σ_i (p_i − q_i)(s_i − t_i)` with
    `p = softmax(s)`, `q = softmax(t)` over the selected entries of `axis`.

    Args:
      s: float logits.
      t: float logits, same shape as `s`.
      where: optional bool/integer array broadcastable to `s.shape`; False entries are
        left out of both softmaxes and of the sum (a row with none selected gives 0).
      axis: axis or axes the softmax runs over.

    Returns:
      Divergence with the `axis` axes removed, float32 (float64 for float64 input).
    """
    s, t, keep, axes = _prepare_pair(s, t, where, axis)
    if keep is not None:
        fill = _checks.large_negative(s.dtype)
        s, t = jnp.where(keep, s, fill), jnp.where(keep, t, fill)
    terms = (jax.nn.softmax(s, axis=axes) - jax.nn.softmax(t, axis=axes)) * (s - t)
    if keep is not None:
        terms = jnp.where(keep, terms, 0)
    return jnp.sum(terms, axis=axes)


def _prepare_pair(s, t, where, axis):
    """Shared checks of the two KL functions; returns compute-dtype arrays, where, axes."""
    _checks.check_floating("s", s)
    _checks.check_floating("t", t)
    _checks.check_same_shape("s", s, "t", t)
    shape = _checks.shape_of(s)
    axes = _normalize_axis(axis, len(shape))
    keep = _prepare_where(where, shape, "s")
    dtype = _checks.compute_dtype(jnp.result_type(s, t))
    return jnp.asarray(s).astype(dtype), jnp.asarray(t).astype(dtype), keep, axes
