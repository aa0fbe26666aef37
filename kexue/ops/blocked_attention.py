"""Blocked (flash-style) attention: online softmax over key blocks, recomputing backward.

Dense attention holds the `[b, h, n_q, n_k]` scores and probabilities; this holds one
`[b, h, block_q, block_k]` block at a time. For each block of queries it walks over the
key blocks it can see, keeping per query a running maximum `m`, the running sum
`l = Σ_j exp(s_ij − m)` and the unnormalised output `Σ_j exp(s_ij − m) v_j`; when a
larger logit arrives the old sums are rescaled by `exp(m_old − m_new)` (online softmax:
Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022, arXiv 2205.14135).

The gradient is a `jax.custom_vjp`: the forward pass saves only the output and the
per-row log-sum-exp `L_i = m_i + log l_i`; the backward pass recomputes each block's
probabilities `p_ij = exp(s_ij − L_i)` and accumulates `dq`, `dk`, `dv` block by block
(FlashAttention-2's backward, arXiv 2307.08691), so training memory is linear in `n` too.

Which keys a query sees comes from `kexue.ops.masks.AttentionMask`. The key blocks of
query block `r` run over `[lo_r, hi_r)`: blocks above the causal diagonal, blocks made
only of padded keys (at the end or the start), and query blocks made only of padded
queries are never computed. Loops have data-dependent bounds (`lax.fori_loop` with
traced limits), which the custom VJP makes legal under `jax.grad`.

`dot_product_attention(..., implementation="blocked")` is the public entry point; this
module holds the kernel and the mask bookkeeping it needs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kexue.ops import _checks
from kexue.ops.masks import AttentionMask

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_Q"]

#: Default query / key block sizes: the fastest of 128 x 128 … 512 x 512 for forward +
#: backward at n = 2048 on CPU, causal and bidirectional, in two runs of
#: `python -m benchmarks.attention --block-sizes` (benchmarks/RESULTS.md).
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 256

# Logit of a masked entry; finite so that `exp(masked − m)` is an exact 0 without NaNs.
_MASKED = -1e30
# Initial running maximum: above `_MASKED`, so masked entries of a row that has seen no
# visible key yet still get `exp(_MASKED − _EMPTY_MAX) = 0`; below any real logit.
_EMPTY_MAX = -5e29


class FlatMask(NamedTuple):
    """An `AttentionMask` checked and flattened to one batch axis `B'` (1 or `B`).

    q_valid: `[B', n_q]` bool or None; kv_valid: `[B', n_k]` bool or None; causal:
    Python bool; offset, prefix: `[B']` int32 or None; mask: `[B', h', n_q, n_k]` bool
    (`h'` 1 or `h`) or None.
    """

    q_valid: jax.Array | None
    kv_valid: jax.Array | None
    causal: bool
    offset: jax.Array | None
    prefix: jax.Array | None
    mask: jax.Array | None


def _flat_part(name: str, value, batch: tuple[int, ...], tail: tuple[int, ...], kinds,
               layout: str) -> jax.Array:
    """`value` with shape `[..., *tail]` → `[B' (1 or prod(batch)), *tail]`."""
    _checks.check_dtype_kind(name, value, kinds)
    value = jnp.asarray(value)
    shape = value.shape
    if len(shape) < len(tail) or shape[len(shape) - len(tail):] != tail:
        raise ValueError(f"`{name}` must have shape {layout} ending in {tail}; got shape "
                         f"{shape}.")
    lead = shape[:len(shape) - len(tail)]
    if len(lead) > len(batch):
        raise ValueError(f"`{name}` with shape {shape} ({layout}) has more leading axes "
                         f"than the batch axes {batch} of q.")
    _checks.check_broadcasts_to(f"{name}.shape[:-{len(tail)}]" if tail else f"{name}.shape",
                                lead, "q's batch axes", batch)
    if all(size == 1 for size in lead):
        return value.reshape((1, *tail))
    value = jnp.broadcast_to(value, (*batch, *tail))
    return value.reshape((math.prod(batch), *tail))


def flatten_mask(mask: AttentionMask, q_shape: tuple[int, ...], n_k: int,
                 dense: jax.Array | None) -> FlatMask:
    """Check the parts of `mask` against `q.shape = [..., n_q, h, d]` and `n_k`.

    `dense` is `mask.mask` already brought to `[B', h', n_q, n_k]` by the caller.
    """
    batch, n_q = tuple(q_shape[:-3]), q_shape[-3]
    if not isinstance(mask.causal, bool):
        raise ValueError(f"`mask.causal` must be a Python bool; got {mask.causal!r}.")

    def as_bool(x):
        return x if x.dtype == jnp.bool_ else x != 0

    q_valid = kv_valid = offset = prefix = None
    if mask.valid is not None:
        q_valid = as_bool(_flat_part("mask.valid", mask.valid, batch, (n_q,),
                                     ("bool", "integer"), "[..., n_q]"))
    if mask.kv_valid is not None:
        kv_valid = as_bool(_flat_part("mask.kv_valid", mask.kv_valid, batch, (n_k,),
                                      ("bool", "integer"), "[..., n_k]"))
    elif q_valid is not None and n_q == n_k:
        kv_valid = q_valid
    if mask.prefix_lengths is not None:
        if not mask.causal:
            raise ValueError("`mask.prefix_lengths` needs `mask.causal=True` (a prefix-LM "
                             "mask is causal outside the prefix); got causal=False.")
        prefix = _flat_part("mask.prefix_lengths", mask.prefix_lengths, batch, (),
                            ("integer",), "[...]").astype(jnp.int32)
    if mask.causal:
        q_offset = n_k - n_q if mask.q_offset is None else mask.q_offset
        if isinstance(q_offset, bool):
            raise ValueError(f"`mask.q_offset` must be an int or an integer array; got "
                             f"{q_offset!r}.")
        offset = _flat_part("mask.q_offset", q_offset, batch, (), ("integer",),
                            "[...]").astype(jnp.int32)
    return FlatMask(q_valid, kv_valid, mask.causal, offset, prefix, dense)


def _broadcast_rows(x: jax.Array | None, rows: int) -> jax.Array | None:
    return None if x is None else jnp.broadcast_to(x, (rows, *x.shape[1:]))


def dense_mask(flat: FlatMask, n_q: int, n_k: int) -> jax.Array | None:
    """The boolean mask `[B', h', n_q, n_k]` equivalent to `flat` (None: no mask)."""
    parts = []
    if flat.q_valid is not None:
        parts.append(flat.q_valid[:, None, :, None])
    if flat.kv_valid is not None:
        parts.append(flat.kv_valid[:, None, None, :])
    if flat.causal:
        rows = jnp.arange(n_q, dtype=jnp.int32)[None, :] + flat.offset[:, None]
        keys = jnp.arange(n_k, dtype=jnp.int32)
        visible = keys[None, None, :] <= rows[:, :, None]
        if flat.prefix is not None:
            visible = visible | (keys[None, None, :] < flat.prefix[:, None, None])
        parts.append(visible[:, None])
    if flat.mask is not None:
        parts.append(flat.mask)
    if not parts:
        return None
    result = parts[0]
    for part in parts[1:]:
        result = result & part
    rows = max(part.shape[0] for part in parts)
    heads = max(part.shape[1] for part in parts)
    return jnp.broadcast_to(result, (rows, heads, n_q, n_k))


def visible_counts(flat: FlatMask, n_q: int, n_k: int) -> jax.Array:
    """Number of keys each query sees, int32 `[B', h', n_q]`, in `O(n)` without a mask.

    With `C(t)` the number of valid keys among `0 … t`, a causal query `i` sees
    `C(min(max(i + offset, prefix − 1), n_k − 1))` keys and a bidirectional one
    `C(n_k − 1)`; a padded query sees none. A general `mask` part is summed instead
    (`O(n²)`, like the mask itself).
    """
    if flat.mask is not None:
        # The barrier keeps XLA from constant-folding the sum of a constant mask (slow
        # compiles at long lengths).
        barrier = flat._replace(mask=jax.lax.optimization_barrier(flat.mask))
        return jnp.sum(dense_mask(barrier, n_q, n_k), axis=-1, dtype=jnp.int32)
    if flat.kv_valid is None:
        cumulative = None
    else:
        cumulative = jnp.cumsum(flat.kv_valid, axis=-1, dtype=jnp.int32)
        cumulative = jnp.pad(cumulative, ((0, 0), (1, 0)))  # C(t) at index t + 1
    if flat.causal:
        last = jnp.arange(n_q, dtype=jnp.int32)[None, :] + flat.offset[:, None]
        if flat.prefix is not None:
            last = jnp.maximum(last, flat.prefix[:, None] - 1)
        last = jnp.clip(last, -1, n_k - 1)  # [B', n_q]
        if cumulative is None:
            counts = last + 1
        else:
            rows = max(cumulative.shape[0], last.shape[0])
            counts = jnp.take_along_axis(_broadcast_rows(cumulative, rows),
                                         _broadcast_rows(last + 1, rows), axis=-1)
    elif cumulative is None:
        counts = jnp.full((1, n_q), n_k, jnp.int32)
    else:
        counts = jnp.broadcast_to(cumulative[:, -1:], (cumulative.shape[0], n_q))
    if flat.q_valid is not None:
        counts = jnp.where(flat.q_valid, counts, 0)
    return counts[:, None, :]


# ----------------------------------------------------------------------------- kernel


class _Static(NamedTuple):
    """Hashable settings of one kernel call (custom_vjp non-differentiable argument)."""

    causal: bool
    block_q: int
    block_k: int


class _Aux(NamedTuple):
    """Non-differentiable kernel inputs, in kernel layout (padded lengths `Nq`, `Nk`).

    kv_valid: `[B, Nk]` bool or None; offset, prefix: `[B]` int32 or None; mask:
    `[B', h', Nq, Nk]` bool or None; lo, hi: `[Nq / block_q]` int32 key-block ranges.
    """

    kv_valid: jax.Array | None
    offset: jax.Array | None
    prefix: jax.Array | None
    mask: jax.Array | None
    lo: jax.Array
    hi: jax.Array


def _visible(static: _Static, aux: _Aux, q_block: jax.Array, k_block: jax.Array,
             groups: int) -> jax.Array | None:
    """Visibility of block `(q_block, k_block)`, broadcastable to `[B, H, bq, G, bk]`."""
    bq, bk = static.block_q, static.block_k
    visible = None
    if aux.kv_valid is not None:
        keys = jax.lax.dynamic_slice_in_dim(aux.kv_valid, k_block * bk, bk, axis=1)
        visible = keys[:, None, None, None, :]
    if static.causal:
        rows = q_block * bq + jnp.arange(bq, dtype=jnp.int32)
        keys = k_block * bk + jnp.arange(bk, dtype=jnp.int32)
        last = rows[None, :] + aux.offset[:, None]  # [B, bq]
        causal = keys[None, None, :] <= last[:, :, None]
        if aux.prefix is not None:
            causal = causal | (keys[None, None, :] < aux.prefix[:, None, None])
        causal = causal[:, None, :, None, :]
        visible = causal if visible is None else visible & causal
    if aux.mask is not None:
        rows_m, heads_m = aux.mask.shape[:2]
        block = jax.lax.dynamic_slice(aux.mask, (0, 0, q_block * bq, k_block * bk),
                                      (rows_m, heads_m, bq, bk))
        if heads_m == 1:
            block = block[:, :, :, None, :]
        else:  # query head j = kv head j // G, group member j % G
            block = block.reshape(rows_m, heads_m // groups, groups, bq, bk)
            block = jnp.swapaxes(block, 2, 3)
        visible = block if visible is None else visible & block
    return visible


def _block_scores(static: _Static, aux: _Aux, q_block, k_block, q, k, scale):
    """Scaled, masked logits `[B, H, bq, G, bk]` of one block, in the scale's dtype
    (float32, or float64 for float64 inputs)."""
    s = jnp.einsum("bhqgd,bhkd->bhqgk", q, k, preferred_element_type=scale.dtype)
    s = s * scale[..., None]
    visible = _visible(static, aux, q_block, k_block, q.shape[3])
    return s if visible is None else jnp.where(visible, s, _MASKED)


def _q_rows(x: jax.Array, q_block, block_q: int) -> jax.Array:
    """Rows `q_block·bq … +bq` of a kernel-layout array `[B, H, Nq, G, ...]`."""
    return jax.lax.dynamic_slice_in_dim(x, q_block * block_q, block_q, axis=2)


def _forward(static: _Static, q, k, v, scale, aux: _Aux):
    """Blocked forward pass: output `[B, H, Nq, G, d]` and log-sum-exp `[B, H, Nq, G]`."""
    batch, heads, _, groups, d = q.shape
    bq, bk = static.block_q, static.block_k
    accumulate = scale.dtype  # accumulation dtype: float32 (float64 for float64 inputs)

    def query_block(_, q_block):
        q_b = _q_rows(q, q_block, bq)
        scale_b = _q_rows(scale, q_block, bq)
        stats_shape = (batch, heads, bq, groups)

        def key_block(k_block, carry):
            m, total, acc = carry
            k_b = jax.lax.dynamic_slice_in_dim(k, k_block * bk, bk, axis=2)
            v_b = jax.lax.dynamic_slice_in_dim(v, k_block * bk, bk, axis=2)
            s = _block_scores(static, aux, q_block, k_block, q_b, k_b, scale_b)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            total = correction * total + jnp.sum(p, axis=-1)
            acc = correction[..., None] * acc + jnp.einsum(
                "bhqgk,bhkd->bhqgd", p.astype(v.dtype), v_b,
                preferred_element_type=accumulate)
            return m_new, total, acc

        init = (jnp.full(stats_shape, _EMPTY_MAX, accumulate),
                jnp.zeros(stats_shape, accumulate),
                jnp.zeros((*stats_shape, d), accumulate))
        m, total, acc = jax.lax.fori_loop(aux.lo[q_block], aux.hi[q_block], key_block, init)
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        out = acc / total[..., None]
        lse = jnp.where(seen, m + jnp.log(total), 0.0)
        return None, (out, lse)

    _, (out, lse) = jax.lax.scan(query_block, None, jnp.arange(aux.lo.shape[0]))
    # [nqb, B, H, bq, G, ...] -> [B, H, Nq, G, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, -1, groups, d)
    lse = jnp.moveaxis(lse, 0, 2).reshape(batch, heads, -1, groups)
    return out.astype(q.dtype), lse


def _backward(static: _Static, q, k, v, scale, aux: _Aux, out, lse, d_out):
    """Gradients `(dq, dk, dv)` recomputing each block's probabilities from `lse`."""
    batch, heads, _, groups, d = q.shape
    bq, bk = static.block_q, static.block_k
    accumulate = scale.dtype  # accumulation dtype: float32 (float64 for float64 inputs)
    # D_i = Σ_d dO_id O_id = Σ_j p_ij dp_ij: the softmax-gradient row term.
    delta = jnp.sum(d_out.astype(accumulate) * out.astype(accumulate), axis=-1)

    def query_block(carry, q_block):
        q_b = _q_rows(q, q_block, bq)
        scale_b = _q_rows(scale, q_block, bq)
        lse_b = _q_rows(lse, q_block, bq)
        delta_b = _q_rows(delta, q_block, bq)
        d_out_b = _q_rows(d_out, q_block, bq)

        def key_block(k_block, carry):
            dq, dk, dv = carry
            start = k_block * bk
            k_b = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=2)
            v_b = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=2)
            s = _block_scores(static, aux, q_block, k_block, q_b, k_b, scale_b)
            p = jnp.exp(s - lse_b[..., None])
            dv_b = jnp.einsum("bhqgk,bhqgd->bhkd", p.astype(d_out.dtype), d_out_b,
                              preferred_element_type=accumulate)
            dp = jnp.einsum("bhqgd,bhkd->bhqgk", d_out_b, v_b,
                            preferred_element_type=accumulate)
            ds = p * (dp - delta_b[..., None]) * scale_b[..., None]
            dq = dq + jnp.einsum("bhqgk,bhkd->bhqgd", ds.astype(k.dtype), k_b,
                                 preferred_element_type=accumulate)
            dk_b = jnp.einsum("bhqgk,bhqgd->bhkd", ds.astype(q.dtype), q_b,
                              preferred_element_type=accumulate)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, bk, axis=2) + dk_b, start, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, bk, axis=2) + dv_b, start, axis=2)
            return dq, dk, dv

        dk, dv = carry
        dq = jnp.zeros((batch, heads, bq, groups, d), accumulate)
        dq, dk, dv = jax.lax.fori_loop(aux.lo[q_block], aux.hi[q_block], key_block,
                                       (dq, dk, dv))
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, accumulate)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(aux.lo.shape[0]))
    dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _kernel_primal(static: _Static, q, k, v, scale, aux: _Aux):
    return _forward(static, q, k, v, scale, aux)[0]


def _kernel_fwd(static: _Static, q, k, v, scale, aux: _Aux):
    out, lse = _forward(static, q, k, v, scale, aux)
    return out, (q, k, v, scale, aux, out, lse)


def _kernel_bwd(static: _Static, residuals, d_out):
    q, k, v, scale, aux, out, lse = residuals
    dq, dk, dv = _backward(static, q, k, v, scale, aux, out, lse, d_out)
    return dq, dk, dv, None, None  # the scale and the mask get no gradient


_kernel = jax.custom_vjp(_kernel_primal, nondiff_argnums=(0,))
_kernel.defvjp(_kernel_fwd, _kernel_bwd)


# ----------------------------------------------------------------------------- entry


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _first_last(any_true: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Index of the first and last True along `axis`, and whether there is one."""
    size = any_true.shape[axis]
    first = jnp.argmax(any_true, axis=axis).astype(jnp.int32)
    last = size - 1 - jnp.argmax(jnp.flip(any_true, axis), axis=axis).astype(jnp.int32)
    return first, last, jnp.any(any_true, axis=axis)


def _key_block_ranges(flat: FlatMask, n_q: int, n_k: int, bq: int, bk: int,
                      padded_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`[lo_r, hi_r)` per query block `r`: the key blocks any of its queries can see."""
    nqb, nkb = -(-n_q // bq), -(-n_k // bk)
    lo = jnp.zeros((nqb,), jnp.int32)
    hi = jnp.full((nqb,), nkb, jnp.int32)
    if flat.kv_valid is not None:  # skip leading and trailing padded keys
        first, last, has = _first_last(jnp.any(flat.kv_valid, axis=0), 0)
        lo = jnp.maximum(lo, first // bk)
        hi = jnp.minimum(hi, jnp.where(has, last // bk + 1, 0))
    if flat.causal:  # skip blocks above the diagonal
        last_row = jnp.minimum(jnp.arange(nqb, dtype=jnp.int32) * bq + bq - 1, n_q - 1)
        last_key = last_row + jnp.max(flat.offset)
        if flat.prefix is not None:
            last_key = jnp.maximum(last_key, jnp.max(flat.prefix) - 1)
        hi = jnp.minimum(hi, jnp.where(last_key >= 0,
                                       jnp.minimum(last_key, n_k - 1) // bk + 1, 0))
    if flat.q_valid is not None:  # skip query blocks made only of padding
        rows = _pad_axis(jnp.any(flat.q_valid, axis=0), 0, nqb * bq, False)
        hi = jnp.where(jnp.any(rows.reshape(nqb, bq), axis=-1), hi, 0)
    if padded_mask is not None:  # skip blocks the general mask hides entirely
        rows_m, heads_m = padded_mask.shape[:2]
        blocks = jnp.any(padded_mask.reshape(rows_m, heads_m, nqb, bq, nkb, bk),
                         axis=(0, 1, 3, 5))
        first, last, has = _first_last(blocks, 1)
        lo = jnp.maximum(lo, first)
        hi = jnp.minimum(hi, jnp.where(has, last + 1, 0))
    return lo, jnp.maximum(hi, lo)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, row_scale: jax.Array,
              flat: FlatMask, *, block_q: int, block_k: int) -> jax.Array:
    """Blocked attention on checked, batch-flattened inputs.

    Args:
      q: `[B, n_q, h, d]`; k, v: `[B, n_k, h_kv, d]` (same float dtype; `h % h_kv == 0`).
      row_scale: float `[B', h', n_q]` (`B'` 1 or `B`, `h'` 1 or `h`): the logit scale
        of each query, `s_ij = row_scale_i · q_i·k_j`.
      flat: the mask (`flatten_mask`, or `FlatMask` with only `mask` set).
      block_q, block_k: block sizes (clipped to `n_q`, `n_k`; the lengths are padded to
        multiples of them).

    Returns:
      `[B, n_q, h, d]` in `q.dtype`, accumulated in float32 (float64 for float64
      inputs); zeros for queries that see no key.
    """
    batch, n_q, h, d = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    if n_q == 0 or n_k == 0:
        raise ValueError(f"Blocked attention needs at least one query and one key; got "
                         f"q.shape={q.shape} and k.shape={k.shape}.")
    groups = h // h_kv
    bq, bk = min(block_q, n_q), min(block_k, n_k)
    nq_pad, nk_pad = -(-n_q // bq) * bq, -(-n_k // bk) * bk

    # Kernel layout: q [B, H, Nq, G, d], k/v [B, H, Nk, d], scale [B', H', Nq, G'].
    qt = _pad_axis(jnp.moveaxis(q.reshape(batch, n_q, h_kv, groups, d), 1, 2), 2, nq_pad)
    kt = _pad_axis(jnp.swapaxes(k, 1, 2), 2, nk_pad)
    vt = _pad_axis(jnp.swapaxes(v, 1, 2), 2, nk_pad)
    rows_s, heads_s = row_scale.shape[:2]
    if heads_s == 1:
        scale = row_scale[:, :, :, None]
    else:
        scale = jnp.swapaxes(row_scale.reshape(rows_s, h_kv, groups, n_q), 2, 3)
    scale = _pad_axis(scale.astype(_checks.compute_dtype(q.dtype)), 2, nq_pad)

    kv_valid = flat.kv_valid
    if kv_valid is None and nk_pad > n_k:
        kv_valid = jnp.ones((1, n_k), bool)
    if kv_valid is not None:
        kv_valid = _pad_axis(kv_valid, 1, nk_pad, False)
    mask = flat.mask
    if mask is not None:
        mask = _pad_axis(_pad_axis(mask, 2, nq_pad, False), 3, nk_pad, False)
    lo, hi = _key_block_ranges(flat, n_q, n_k, bq, bk, mask)
    aux = _Aux(kv_valid, flat.offset, flat.prefix, mask, lo, hi)

    out = _kernel(_Static(flat.causal, bq, bk), qt, kt, vt, scale, aux)
    out = jnp.moveaxis(out[:, :, :n_q], 2, 1).reshape(batch, n_q, h, d)
    if flat.q_valid is not None:
        out = jnp.where(flat.q_valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
