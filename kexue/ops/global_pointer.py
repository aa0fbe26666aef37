"""GlobalPointer span scoring for NER, its efficient variant, decoding and span F1.

GlobalPointer (kexue.fm/archives/8373) scores every candidate span `(i, j)`, `i ≤ j`, of
a sequence for every entity type `α` at once, as an inner product of a "start" vector at
`i` and an "end" vector at `j`:

    s_α(i, j) = (R_i q_{i,α})ᵀ (R_j k_{j,α}) / √d,

with RoPE rotations `R_i` (kexue.fm/archives/8265) so that the score sees the relative
position `j − i`. Spans with `j < i` (the strict lower triangle) and spans touching a
padding token are set to a finite, dtype-aware large negative logit. A span is decoded as
an entity of type `α` iff `s_α(i, j) > 0`, the threshold of the ZLPR loss
(`kexue.ops.losses.zlpr_loss`, kexue.fm/archives/7359).

Efficient GlobalPointer (kexue.fm/archives/8877) shares one `(q, k)` pair across types and
adds a per-type bias made of a start part and an end part.

Gold spans are rows `(type, start, end)` (end inclusive), int `[..., P, 3]`, padded with
rows of −1. `spans_to_dense` turns them into the 0/1 labels `[..., types, n, n]` of
`zlpr_loss` and `span_f1`; `spans_to_flat` into the class indices
`type·n² + start·n + end` of `sparse_zlpr_loss` over logits flattened to
`[..., types·n²]`; `decode_spans` reads the best-scoring rows back from logits
(or dense labels), with their scores and count, in a fixed-size (jit-safe) output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops import _checks
from kexue.ops.rope import LAYOUTS, apply_rope

__all__ = [
    "decode_spans",
    "efficient_global_pointer_logits",
    "f1_from_counts",
    "global_pointer_logits",
    "span_f1",
    "spans_to_dense",
    "spans_to_flat",
]


def _check_valid(valid, leading: tuple[int, ...], leading_name: str) -> None:
    """`valid` is a bool/integer `[..., n]` array broadcasting to `leading` (batch…, n)."""
    _checks.check_dtype_kind("valid", valid, ("bool", "integer"))
    _checks.check_min_rank("valid", valid, 1, "[..., n]")
    _checks.check_broadcasts_to("valid", _checks.shape_of(valid), leading_name, leading)


def _span_validity(n: int, valid) -> jax.Array:
    """Bool `[..., 1, n, n]`: span `(i, j)` exists (`i ≤ j`) and both ends are valid tokens."""
    upper = jnp.triu(jnp.ones((n, n), dtype=bool))
    if valid is None:
        return upper
    token = jnp.asarray(valid).astype(bool)
    pair = token[..., :, None] & token[..., None, :]
    return (pair & upper)[..., None, :, :]


def _mask_spans(logits: jax.Array, valid, out_dtype) -> jax.Array:
    """Replace impossible spans of `logits [..., types, n, n]` and cast to `out_dtype`."""
    exists = _span_validity(logits.shape[-1], valid)
    fill = jnp.asarray(_checks.large_negative(out_dtype), logits.dtype)
    return jnp.where(exists, logits, fill).astype(out_dtype)


def _rotate(x: jax.Array, rope: bool, base: float, layout: str,
            seq_axis: int = -3) -> jax.Array:
    """RoPE with positions `0 … n−1` on `x` (`[..., n, h, d]`, or `[..., n, d]` with
    `seq_axis=-2`), in at least float32."""
    x = x.astype(_checks.compute_dtype(x.dtype))
    return apply_rope(x, base=base, layout=layout, seq_axis=seq_axis) if rope else x


def _check_rope_dim(rope: bool, name: str, d: int) -> None:
    if rope and d % 2:
        raise ValueError(
            f"`{name}` must have an even last axis (head dim) when `rope=True`; got d={d}."
        )


def global_pointer_logits(q, k, *, valid=None, rope: bool = True, base: float = 10000.0,
                          layout: str = "interleaved") -> jax.Array:
    """GlobalPointer span logits `s_α(i, j) = (R_i q_{i,α})ᵀ (R_j k_{j,α}) / √d`.

    kexue.fm/archives/8373. Entries with `j < i` and entries whose start or end is a
    padding token are set to `large_negative(q.dtype)` (finite), so they decode as
    "no entity" and contribute nothing to the ZLPR loss.

    Args:
      q: `[..., n, types, d]` start vectors, one per entity type, any float dtype.
      k: `[..., n, types, d]` end vectors, same shape as `q`.
      valid: optional bool or integer `[..., n]` token validity (True or nonzero = real
        token, False or 0 = padding), broadcastable to `q.shape[:-2]`.
      rope: rotate `q` and `k` by their positions `0 … n−1` (`apply_rope`) first.
      base: RoPE frequency base.
      layout: RoPE feature pairing, ``"interleaved"`` (RoFormer) or ``"half"``.

    Returns:
      `[..., types, n, n]` logits in the dtype of `q`, computed in at least float32.
    """
    _checks.check_min_rank("q", q, 3, "[..., n, types, d]")
    _checks.check_floating("q", q)
    _checks.check_floating("k", k)
    _checks.check_same_shape("q", q, "k", k)
    _checks.check_one_of("layout", layout, LAYOUTS)
    q, k = jnp.asarray(q), jnp.asarray(k)
    d = q.shape[-1]
    _check_rope_dim(rope, "q", d)
    if valid is not None:
        _check_valid(valid, tuple(q.shape[:-2]), "q.shape[:-2]")
    qr, kr = _rotate(q, rope, base, layout), _rotate(k, rope, base, layout)
    logits = jnp.einsum("...itd,...jtd->...tij", qr, kr) / math.sqrt(d)
    return _mask_spans(logits, valid, q.dtype)


def efficient_global_pointer_logits(q, k, bias_start, bias_end, *, valid=None,
                                    rope: bool = True, base: float = 10000.0,
                                    layout: str = "interleaved") -> jax.Array:
    """Efficient GlobalPointer logits: one shared `(q, k)` plus a per-type start/end bias.

    kexue.fm/archives/8877:
    `s_α(i, j) = (R_i q_i)ᵀ (R_j k_j) / √d + (bias_start[i, α] + bias_end[j, α]) / 2`.
    The bias `w_αᵀ [q_i; k_i; q_j; k_j]` of the post is split into a start part and an
    end part, each the output of a `2d → types` projection of `[q; k]` at that token
    (so `bias_start[i] = W_s [q_i; k_i]`, `bias_end[j] = W_e [q_j; k_j]`); this op
    applies the halving of the reference implementation, so pass the raw projections.
    Masking as in `global_pointer_logits`.

    Args:
      q: `[..., n, d]` shared start vectors, any float dtype.
      k: `[..., n, d]` shared end vectors, same shape as `q`.
      bias_start: `[..., n, types]` per-type score for a span starting at each token.
      bias_end: `[..., n, types]` per-type score for a span ending at each token; same
        shape as `bias_start`, whose leading axes match `q.shape[:-1]`.
      valid: optional bool or integer `[..., n]` token validity, broadcastable to
        `q.shape[:-1]`.
      rope: rotate `q` and `k` by their positions `0 … n−1` first.
      base: RoPE frequency base.
      layout: RoPE feature pairing, ``"interleaved"`` or ``"half"``.

    Returns:
      `[..., types, n, n]` logits in the dtype of `q`, computed in at least float32.
    """
    _checks.check_min_rank("q", q, 2, "[..., n, d]")
    _checks.check_floating("q", q)
    _checks.check_floating("k", k)
    _checks.check_same_shape("q", q, "k", k)
    _checks.check_min_rank("bias_start", bias_start, 2, "[..., n, types]")
    _checks.check_floating("bias_start", bias_start)
    _checks.check_floating("bias_end", bias_end)
    _checks.check_same_shape("bias_start", bias_start, "bias_end", bias_end)
    q_shape = _checks.shape_of(q)
    if _checks.shape_of(bias_start)[:-1] != q_shape[:-1]:
        raise ValueError(
            f"`bias_start` must have shape q.shape[:-1] + (types,) = {q_shape[:-1]} + "
            f"(types,); got shape {_checks.shape_of(bias_start)}."
        )
    _checks.check_one_of("layout", layout, LAYOUTS)
    q, k = jnp.asarray(q), jnp.asarray(k)
    d = q.shape[-1]
    _check_rope_dim(rope, "q", d)
    if valid is not None:
        _check_valid(valid, tuple(q.shape[:-1]), "q.shape[:-1]")
    qr = _rotate(q, rope, base, layout, seq_axis=-2)
    kr = _rotate(k, rope, base, layout, seq_axis=-2)
    dot = jnp.einsum("...id,...jd->...ij", qr, kr) / math.sqrt(d)
    compute = jnp.result_type(dot, _checks.compute_dtype(jnp.result_type(bias_start)))
    start = jnp.swapaxes(jnp.asarray(bias_start).astype(compute), -1, -2)  # [..., types, n]
    end = jnp.swapaxes(jnp.asarray(bias_end).astype(compute), -1, -2)
    logits = dot[..., None, :, :] + (start[..., :, None] + end[..., None, :]) / 2
    return _mask_spans(logits, valid, q.dtype)


def _check_span_args(spans, num_types, seq_len) -> None:
    _checks.check_min_rank("spans", spans, 2, "[..., P, 3]")
    _checks.check_dtype_kind("spans", spans, ("integer",))
    _checks.check_dim("spans", spans, -1, 3, "rows (type, start, end)")
    for name, value in (("num_types", num_types), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be a positive Python int; got {value!r}.")
    if num_types * seq_len * seq_len >= 2**31:
        raise ValueError(
            f"`num_types` · `seq_len`² must be below 2**31 (int32 indices); got "
            f"num_types={num_types}, seq_len={seq_len}."
        )


def spans_to_flat(spans, num_types: int, seq_len: int) -> jax.Array:
    """Span rows → flat class indices `type·n² + start·n + end` (−1 for padding).

    The index of span `(type, start, end)` in GlobalPointer logits `[..., types, n, n]`
    reshaped to `[..., types·n²]`: the positives of `sparse_zlpr_loss`
    (kexue.fm/archives/8373). A row is a span iff `0 ≤ type < num_types` and
    `0 ≤ start ≤ end < n`; any other row (the −1 padding rows among them) gives −1,
    so an out-of-range row never aliases another span. `jax.jit`-safe.

    Args:
      spans: integer `[..., P, 3]` rows `(type, start, end)`, end inclusive.
      num_types: number of entity types (positive Python int).
      seq_len: sequence length `n` (positive Python int).

    Returns:
      int32 `[..., P]` flat indices in `[0, types·n²)`, or −1.
    """
    _check_span_args(spans, num_types, seq_len)
    spans = jnp.asarray(spans).astype(jnp.int32)
    kind, start, end = spans[..., 0], spans[..., 1], spans[..., 2]
    real = (kind >= 0) & (kind < num_types) & (start >= 0) & (start <= end) & (end < seq_len)
    return jnp.where(real, (kind * seq_len + start) * seq_len + end, -1)


def spans_to_dense(spans, num_types: int, seq_len: int) -> jax.Array:
    """Span rows → dense 0/1 labels `[..., types, n, n]` (kexue.fm/archives/8373).

    `labels[..., type, start, end] = 1` for every span row (a repeated row counts
    once); rows that are not spans are ignored, as in `spans_to_flat`. `jax.jit`-safe;
    memory is one `types·n²` int32 tensor per example.

    Args:
      spans: integer `[..., P, 3]` rows `(type, start, end)`, end inclusive, padded
        with rows of −1.
      num_types: number of entity types (positive Python int).
      seq_len: sequence length `n` (positive Python int).

    Returns:
      int32 `[..., num_types, n, n]` of 0 and 1.
    """
    flat = spans_to_flat(spans, num_types, seq_len)
    rows = flat.reshape(math.prod(flat.shape[:-1]), flat.shape[-1])  # [examples, P]
    real = rows >= 0
    dense = jnp.zeros((rows.shape[0], num_types * seq_len * seq_len), jnp.int32)
    dense = dense.at[jnp.arange(rows.shape[0])[:, None], jnp.where(real, rows, 0)].max(
        real.astype(jnp.int32))
    return dense.reshape(*flat.shape[:-1], num_types, seq_len, seq_len)


def decode_spans(logits, *, max_spans: int, threshold: float = 0.0,
                 valid=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The highest-scoring spans with `logit > threshold`, as padded rows with scores.

    kexue.fm/archives/8373: span `(type, start, end)` is an entity iff its logit is
    above the threshold (0 for ZLPR-trained logits). Candidates are the spans with
    `start ≤ end` (and, with `valid`, both ends real tokens); of those above the
    threshold, the `max_spans` highest are returned, best first, ties in the order of
    the flat index `type·n² + start·n + end` (a stable sort on both keys). Fixed-size output, so
    `jax.jit`- and `vmap`-safe; masked spans of GlobalPointer logits carry a large
    negative logit and do not decode at any threshold above it.

    Args:
      logits: `[..., types, n, n]` float span scores (GlobalPointer logits, or dense
        labels for reading gold spans back).
      max_spans: rows per example (positive Python int); when more spans are above
        the threshold, the lowest-scoring ones are left out (`count` says so).
      threshold: decision threshold (a number or a scalar array).
      valid: optional bool or integer `[..., n]` token validity; spans touching a
        padding token are not candidates.

    Returns:
      `(spans, scores, count)`: int32 `[..., max_spans, 3]` rows `(type, start, end)`
      padded with rows of −1; `[..., max_spans]` their logits (float32, float64 for
      float64 logits), −inf on padding rows; int32 `[...]` the number of spans above
      the threshold, which exceeds `max_spans` when some were left out (the filled
      rows are the first `min(count, max_spans)`).
    """
    _checks.check_min_rank("logits", logits, 3, "[..., types, n, n]")
    _checks.check_floating("logits", logits)
    shape = _checks.shape_of(logits)
    if shape[-1] != shape[-2]:
        raise ValueError(
            f"`logits` must be square on its last two axes [..., types, n, n]; got shape "
            f"{shape}."
        )
    if isinstance(max_spans, bool) or not isinstance(max_spans, int | np.integer) or (
            max_spans < 1):
        raise ValueError(f"`max_spans` must be a positive Python int; got {max_spans!r}.")
    if valid is not None:
        _check_valid(valid, shape[:-3] + shape[-1:], "logits.shape[:-3] + (n,)")
    lead, types, n = shape[:-3], shape[-3], shape[-1]
    dtype = _checks.compute_dtype(jnp.result_type(logits))
    scores = jnp.asarray(logits).astype(dtype)
    above = _span_validity(n, valid) & (scores > jnp.asarray(threshold, dtype))
    above = jnp.broadcast_to(above, scores.shape).reshape(*lead, types * n * n)
    flat = jnp.where(above, scores.reshape(*lead, types * n * n), -jnp.inf)
    k = min(int(max_spans), types * n * n)
    # A lexicographic sort on (−score, flat index) rather than `jax.lax.top_k`, whose
    # order among equal scores XLA:CPU does not keep under `jax.jit` (seen with k = all).
    positions = jnp.broadcast_to(jnp.arange(types * n * n, dtype=jnp.int32), flat.shape)
    negated, index = jax.lax.sort((-flat, positions), dimension=flat.ndim - 1, num_keys=2)
    top, index = -negated[..., :k], index[..., :k]
    count = jnp.sum(above, axis=-1, dtype=jnp.int32)
    filled = jnp.arange(k) < count[..., None]
    rows = jnp.stack([index // (n * n), index // n % n, index % n], axis=-1)
    rows = jnp.where(filled[..., None], rows, -1).astype(jnp.int32)
    top = jnp.where(filled, top, -jnp.inf)
    if k < max_spans:
        pad = [(0, 0)] * len(lead) + [(0, max_spans - k)]
        rows = jnp.pad(rows, [*pad, (0, 0)], constant_values=-1)
        top = jnp.pad(top, pad, constant_values=-jnp.inf)
    return rows, top, count


def f1_from_counts(tp, fp, fn) -> dict[str, jax.Array]:
    """Precision, recall and F1 from (accumulated) span counts.

    `precision = tp / (tp + fp)`, `recall = tp / (tp + fn)`,
    `f1 = 2 tp / (2 tp + fp + fn)`; each is 0 when its denominator is 0.

    Args:
      tp, fp, fn: scalars (Python numbers or arrays, e.g. sums of `span_f1` counts over
        an evaluation set).

    Returns:
      dict with float32 scalars ``"tp"``, ``"fp"``, ``"fn"``, ``"precision"``,
      ``"recall"`` and ``"f1"``.
    """
    tp, fp, fn = (jnp.asarray(c, dtype=jnp.float32) for c in (tp, fp, fn))

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)

    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def span_f1(logits, labels, *, valid=None, threshold: float = 0.0) -> dict[str, jax.Array]:
    """Span-level true/false positives, false negatives, precision, recall and F1.

    A span `(type, i, j)` is predicted iff `logits > threshold` and gold iff
    `labels > 0`. `jax.jit`-safe; sum the counts over batches and call
    `f1_from_counts` for corpus-level scores (kexue.fm/archives/8373).

    Args:
      logits: `[..., types, n, n]` float predicted span scores.
      labels: gold spans, 0/1 (bool, integer or float), same shape as `logits`
        (`spans_to_dense` makes them from span rows).
      valid: optional bool or integer `[..., n]` token validity; spans with an invalid
        start or end, or with `end < start`, are then not counted.
      threshold: decision threshold on the logits.

    Returns:
      dict of float32 scalars, see `f1_from_counts`.
    """
    _checks.check_min_rank("logits", logits, 3, "[..., types, n, n]")
    _checks.check_floating("logits", logits)
    _checks.check_same_shape("logits", logits, "labels", labels)
    shape = _checks.shape_of(logits)
    if valid is not None:
        _check_valid(valid, shape[:-3] + shape[-1:], "logits.shape[:-3] + (n,)")
    pred = jnp.asarray(logits) > threshold
    gold = jnp.asarray(labels) > 0
    if valid is not None:
        exists = _span_validity(shape[-1], valid)
        pred, gold = pred & exists, gold & exists
    tp = jnp.sum(pred & gold)
    fp = jnp.sum(pred & ~gold)
    fn = jnp.sum(~pred & gold)
    return f1_from_counts(tp, fp, fn)
