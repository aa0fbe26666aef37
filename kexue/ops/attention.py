"""Scaled dot-product attention with the entropy-invariant scale, masks and grouped queries.

Standard attention scales logits by `1/√d`. The entropy of a query's attention
distribution then grows like `log n` with the number `n` of keys it can see, so a model
trained on short sequences attends too diffusely on long ones. Entropy-invariant
attention (kexue.fm/archives/8823, 9034, 9588) scales the logits of query `i` by
`log_b(n_i)/√d` instead, with `n_i` the number of keys that query sees and `b` the
length the rest of the model was tuned at (512 by default; at `n_i = b` it is standard
attention). The factor is per query, so it is folded into `q` before the dot product and
the fused kernels of `jax.nn.dot_product_attention` (cuDNN flash on GPU) still apply.
``implementation="blocked"`` computes the same attention block by block
(`kexue.ops.blocked_attention`) with memory linear in the length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops import _checks, blocked_attention
from kexue.ops.masks import AttentionMask

__all__ = ["IMPLEMENTATIONS", "SCALES", "attention_entropy", "dot_product_attention",
           "entropy_invariant_scale"]

SCALES = ("standard", "entropy_invariant")
#: `implementation` values: None (per backend, `default_implementation`),
#: `jax.nn.dot_product_attention`'s ``"xla"`` / ``"cudnn"``, and kexue's ``"blocked"``
#: (`kexue.ops.blocked_attention`).
IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")


def _check_entropy_base(entropy_base) -> float:
    if (isinstance(entropy_base, bool)
            or not isinstance(entropy_base, int | float | np.integer | np.floating)
            or not math.isfinite(entropy_base) or not entropy_base > 1):
        raise ValueError(
            f"`entropy_base` must be a finite number greater than 1; got {entropy_base!r}."
        )
    return float(entropy_base)


def entropy_invariant_scale(num_keys, *, entropy_base: float = 512.0) -> jax.Array:
    """The entropy-invariant logit factor `log(max(n, 1)) / log(b)` (kexue.fm/archives/8823).

    Multiplying the standard `1/√d` scale by this factor keeps the attention entropy of
    a query roughly independent of the number `n` of keys it sees; it is 1 at `n = b`.
    A query that sees one key (or none, clamped to one) gets factor 0: its single key
    takes all the weight whatever the logits.

    Args:
      num_keys: integer or float array (or number) of visible keys `n`, any shape.
      entropy_base: `b`, the training length the other hyper-parameters were tuned at.

    Returns:
      Array with the shape of `num_keys`, float32 (float64 if `num_keys` is float64).
    """
    base = _check_entropy_base(entropy_base)
    _checks.check_dtype_kind("num_keys", num_keys, ("integer", "floating"))
    dtype = jnp.result_type(num_keys)
    dtype = _checks.compute_dtype(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32)
    n = jnp.maximum(jnp.asarray(num_keys).astype(dtype), 1)
    return jnp.log(n) / jnp.asarray(math.log(base), dtype)


def _check_scale(scale) -> None:
    if isinstance(scale, str):
        _checks.check_one_of("scale", scale, SCALES)
    elif (isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating)
          or not math.isfinite(scale)):
        raise ValueError(
            f"`scale` must be one of {list(SCALES)} or a finite Python number; got {scale!r}."
        )


def _prepare_mask(mask, q_shape: tuple[int, ...], n_k: int) -> jax.Array:
    """Validate `mask` and bring it to `[B or 1, h or 1, n_q, n_k]` (batch axes flattened).

    A mask with fewer axes than `q` is `[..., n_q, n_k]` and gets a head axis; one with as
    many is `[..., h, n_q, n_k]`.
    """
    *batch, n_q, h, _ = q_shape
    target = (*batch, h, n_q, n_k)
    _checks.check_dtype_kind("mask", mask, ("bool",))
    shape = _checks.shape_of(mask)
    if len(shape) > len(q_shape):
        raise ValueError(
            f"`mask` must have at most {len(q_shape)} axes ([..., h, n_q, n_k] for q with "
            f"shape {tuple(q_shape)}); got shape {shape}."
        )
    if len(shape) < 2:
        raise ValueError(f"`mask` must have at least 2 axes ([..., n_q, n_k]); got shape {shape}.")
    expanded = (*shape[:-2], 1, *shape[-2:]) if len(shape) < len(q_shape) else shape
    expanded = (*(1,) * (len(target) - len(expanded)), *expanded)
    try:
        fits = tuple(np.broadcast_shapes(expanded, target)) == target
    except ValueError:
        fits = False
    if not fits:
        layout = "[..., n_q, n_k]" if len(shape) < len(q_shape) else "[..., h, n_q, n_k]"
        raise ValueError(
            f"`mask` with shape {shape} (read as {layout}) does not broadcast to "
            f"[..., h, n_q, n_k] = {target} for q.shape={tuple(q_shape)} and n_k={n_k}."
        )
    mask = jnp.asarray(mask).reshape(expanded)
    mask_batch = mask.shape[:-3]
    heads = mask.shape[-3]
    if all(size == 1 for size in mask_batch):
        flat_batch = 1
    else:
        mask = jnp.broadcast_to(mask, (*batch, *mask.shape[-3:]))
        flat_batch = math.prod(batch)
    mask = mask.reshape((flat_batch, *mask.shape[-3:]))
    return jnp.broadcast_to(mask, (flat_batch, heads, n_q, n_k))


def _check_block(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive Python int or None; got {value!r}.")
    return int(value)


def dot_product_attention(q, k, v, *, mask=None, scale: str | float = "standard",
                          entropy_base: float = 512.0, implementation: str | None = None,
                          block_q: int | None = None,
                          block_k: int | None = None) -> jax.Array:
    """Multi-head attention `softmax(κ_i q_i·k_j + mask) v` with grouped-query heads.

    The logit scale `κ_i` of query `i` is `1/√d` for ``scale="standard"``,
    `log_b(n_i)/√d` for ``scale="entropy_invariant"`` (kexue.fm/archives/8823; `n_i` is
    the number of keys query `i` sees in `mask`, per head, `n_k` without a mask, clamped
    to at least 1; `b = entropy_base`), or the given number. Query head `j` reads
    key/value head `j // (h / h_kv)` (grouped-query attention; `h_kv = 1` is multi-query).
    The per-query factor multiplies `q` before `jax.nn.dot_product_attention` is called,
    so its fused kernels apply; a scale that is the same for all queries (standard, a
    number, or entropy-invariant without a mask) is passed to it directly.

    With ``implementation="blocked"`` the same function is computed by
    `kexue.ops.blocked_attention`: online softmax over key blocks with a recomputing
    custom VJP, so neither the forward nor the backward pass holds more than a
    `[block_q, block_k]` block of scores per head, and memory is linear in `n`. Given an
    `AttentionMask`, it skips key blocks above the causal diagonal and blocks of padding,
    and counts the visible keys per query in `O(n)`. Its gradient is reverse-mode only
    (`jax.grad`/`jax.vjp`, not `jax.jvp`).

    Args:
      q: `[..., n_q, h, d]` queries, float dtype.
      k: `[..., n_k, h_kv, d]` keys, same dtype and leading axes as `q`, `h % h_kv == 0`.
      v: `[..., n_k, h_kv, d]` values, same shape and dtype as `k`.
      mask: optional, True = may attend: a bool array, either `[..., n_q, n_k]` (fewer
        axes than `q`; shared by all heads) or `[..., h, n_q, n_k]` (as many axes as
        `q`), each broadcastable to `q.shape[:-3] + (h, n_q, n_k)`; or an
        `AttentionMask` (validity, causal flag and offset, prefix lengths: the same
        mask in `O(n)` form, which the blocked implementation reads directly). See
        `kexue.ops.masks`.
      scale: ``"standard"``, ``"entropy_invariant"`` or a Python number (the logit
        scale itself, `1/√d` not applied on top).
      entropy_base: `b` of the entropy-invariant scale (the tuned training length).
      implementation: ``"blocked"`` (kexue's blocked attention), or passed to
        `jax.nn.dot_product_attention` (``"xla"``, ``"cudnn"``). None picks per backend
        (`default_implementation`): blocked on CPU from `CPU_BLOCKED_MIN_KEYS` keys on,
        XLA's choice otherwise.
      block_q, block_k: query / key block sizes of the blocked implementation (None:
        `blocked_attention.DEFAULT_BLOCK_Q` / `DEFAULT_BLOCK_K`); an error with
        ``"xla"`` or ``"cudnn"``.

    Returns:
      `[..., n_q, h, d]` in the dtype of `q`. A query that sees no key gets zeros (with
      finite, zero gradients), not the mean of the values.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_min_rank(name, x, 3, "[..., n, heads, d]")
        _checks.check_floating(name, x)
    _checks.check_same_shape("k", k, "v", v)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            "`q`, `k` and `v` must have the same dtype; "
            f"got q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}."
        )
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(
            "`q` and `k` must have the same leading (batch) axes; "
            f"got q.shape={q.shape} and k.shape={k.shape}."
        )
    _checks.check_dim("k", k, -1, q.shape[-1], "head dim d of q")
    *batch, n_q, h, d = q.shape
    n_k, h_kv = k.shape[-3], k.shape[-2]
    if h % h_kv:
        raise ValueError(
            f"The number of query heads must be a multiple of the key/value heads; got "
            f"q.shape={q.shape} (h={h}) and k.shape={k.shape} (h_kv={h_kv})."
        )
    _check_scale(scale)
    base = _check_entropy_base(entropy_base)
    _checks.check_one_of("implementation", implementation, IMPLEMENTATIONS)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    if implementation in ("xla", "cudnn") and (block_q is not None or block_k is not None):
        raise ValueError(f"`block_q` and `block_k` apply to implementation='blocked' only; "
                         f"got implementation={implementation!r} with block_q={block_q}, "
                         f"block_k={block_k}.")
    if implementation is None:
        implementation = default_implementation(n_k)

    flat = math.prod(batch)
    q4 = q.reshape(flat, n_q, h, d)
    k4 = k.reshape(flat, n_k, h_kv, d)
    v4 = v.reshape(flat, n_k, h_kv, d)
    structure = None
    if isinstance(mask, AttentionMask):
        dense = None if mask.mask is None else _prepare_mask(mask.mask, q.shape, n_k)
        structure = blocked_attention.flatten_mask(mask, q.shape, n_k, dense)
    if implementation == "blocked":
        if structure is None:
            structure = blocked_attention.FlatMask(
                None, None, False, None, None,
                None if mask is None else _prepare_mask(mask, q.shape, n_k))
        out = _blocked(q4, k4, v4, structure, scale, base, block_q, block_k)
        return out.reshape(q.shape)
    if structure is not None:
        mask4 = blocked_attention.dense_mask(structure, n_q, n_k)
    else:
        mask4 = None if mask is None else _prepare_mask(mask, q.shape, n_k)

    kernel_scale = 1.0
    counts = None  # visible keys per (batch, head, query), when the scale needs them
    if scale == "standard":
        kernel_scale = 1.0 / math.sqrt(d)
    elif scale == "entropy_invariant":
        if mask4 is None:
            kernel_scale = math.log(n_k) / math.log(base) / math.sqrt(d)
        else:
            compute = _checks.compute_dtype(q.dtype)
            # [B', h', n_q]. The barrier keeps XLA from constant-folding this sum when the
            # mask is a constant (a causal mask); folding a [n, n] reduction costs compile
            # time that grows with n and saves no run time.
            counts = jnp.sum(jax.lax.optimization_barrier(mask4), axis=-1, dtype=jnp.int32)
            factor = entropy_invariant_scale(counts.astype(compute), entropy_base=base)
            factor = jnp.swapaxes(factor, -1, -2)[..., None]  # [B', n_q, h', 1]
            q4 = (q4.astype(compute) * (factor / math.sqrt(d))).astype(q.dtype)
    else:
        kernel_scale = float(scale)

    out = jax.nn.dot_product_attention(q4, k4, v4, mask=mask4, scale=kernel_scale,
                                       implementation=implementation)
    if mask4 is not None:
        seen = jnp.any(mask4, axis=-1) if counts is None else counts > 0
        seen = jnp.swapaxes(seen, -1, -2)[..., None]  # [B', n_q, h', 1]
        out = jnp.where(seen, out, jnp.zeros((), out.dtype))
    return out.reshape(q.shape).astype(q.dtype)


def attention_entropy(q, k, *, mask=None, scale: str | float = "standard",
                      entropy_base: float = 512.0) -> jax.Array:
    """The entropy (nats) of each query's attention distribution `softmax(κ_i q_i·k_j)`.

    The quantity entropy-invariant attention is about (kexue.fm/archives/8823): with the
    standard scale it grows like `log n` with the number `n` of visible keys; the
    `log_b(n)` factor is meant to keep it level. Same arguments and the same logit scale
    `κ_i` as `dot_product_attention` (grouped-query heads, bool or `AttentionMask`
    masks), but the distribution itself is returned as `H_i = logsumexp_j z_ij −
    Σ_j p_ij z_ij`, not applied to values. It is computed densely (memory `O(n_q·n_k)`
    per head): a measurement, not a training op.

    Args:
      q: `[..., n_q, h, d]` queries, float dtype.
      k: `[..., n_k, h_kv, d]` keys, same dtype and leading axes as `q`, `h % h_kv == 0`.
      mask: as in `dot_product_attention` (True = may attend), or None.
      scale: ``"standard"``, ``"entropy_invariant"`` or a Python number (the logit scale).
      entropy_base: `b` of the entropy-invariant scale.

    Returns:
      float32 `[..., n_q, h]` (float64 for float64 inputs): `H_i`, in `[0, log n_i]`; 0
      for a query that sees no key.
    """
    for name, x in (("q", q), ("k", k)):
        _checks.check_min_rank(name, x, 3, "[..., n, heads, d]")
        _checks.check_floating(name, x)
    q, k = jnp.asarray(q), jnp.asarray(k)
    if q.dtype != k.dtype:
        raise ValueError(f"`q` and `k` must have the same dtype; got q.dtype={q.dtype}, "
                         f"k.dtype={k.dtype}.")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError("`q` and `k` must have the same leading (batch) axes; "
                         f"got q.shape={q.shape} and k.shape={k.shape}.")
    _checks.check_dim("k", k, -1, q.shape[-1], "head dim d of q")
    *batch, n_q, h, d = q.shape
    n_k, h_kv = k.shape[-3], k.shape[-2]
    if h % h_kv:
        raise ValueError(
            f"The number of query heads must be a multiple of the key/value heads; got "
            f"q.shape={q.shape} (h={h}) and k.shape={k.shape} (h_kv={h_kv}).")
    _check_scale(scale)
    base = _check_entropy_base(entropy_base)
    compute = _checks.compute_dtype(q.dtype)
    flat = math.prod(batch)
    q4 = q.reshape(flat, n_q, h, d).astype(compute)
    k4 = jnp.repeat(k.reshape(flat, n_k, h_kv, d).astype(compute), h // h_kv, axis=2)
    if isinstance(mask, AttentionMask):
        dense = None if mask.mask is None else _prepare_mask(mask.mask, q.shape, n_k)
        mask4 = blocked_attention.dense_mask(
            blocked_attention.flatten_mask(mask, q.shape, n_k, dense), n_q, n_k)
    else:
        mask4 = None if mask is None else _prepare_mask(mask, q.shape, n_k)
    if mask4 is None:
        mask4 = jnp.ones((1, 1, n_q, n_k), bool)
    mask4 = jnp.broadcast_to(mask4, (mask4.shape[0], h, n_q, n_k))  # [B' , h, n_q, n_k]
    counts = jnp.sum(mask4, axis=-1)  # [B', h, n_q]
    if scale == "standard":
        kappa = jnp.asarray(1.0 / math.sqrt(d), compute)
    elif scale == "entropy_invariant":
        kappa = entropy_invariant_scale(counts.astype(compute), entropy_base=base) / math.sqrt(d)
        kappa = kappa[..., None]
    else:
        kappa = jnp.asarray(float(scale), compute)
    z = jnp.einsum("bqhd,bkhd->bhqk", q4, k4) * kappa
    seen = counts > 0
    # log p over the visible keys (a query that sees none gets a dummy row, zeroed below).
    log_p = jax.nn.log_softmax(jnp.where(mask4, z, -jnp.inf), axis=-1,
                               where=mask4 | ~seen[..., None])
    p_log_p = jnp.where(mask4, jnp.exp(log_p) * log_p, 0.0)
    entropy = jnp.where(seen, jnp.maximum(-jnp.sum(p_log_p, axis=-1), 0.0), 0.0)
    entropy = jnp.broadcast_to(entropy, (flat, h, n_q))
    return jnp.swapaxes(entropy, -1, -2).reshape(*batch, n_q, h)


def _blocked(q4, k4, v4, structure: blocked_attention.FlatMask, scale, base: float,
             block_q: int | None, block_k: int | None) -> jax.Array:
    """`dot_product_attention` on `[B, n, heads, d]` inputs with the blocked kernel."""
    n_q, d = q4.shape[1], q4.shape[-1]
    n_k = k4.shape[1]
    unmasked = not structure.causal and all(
        part is None for part in (structure.q_valid, structure.kv_valid, structure.mask))
    if scale == "entropy_invariant" and not unmasked:
        counts = blocked_attention.visible_counts(structure, n_q, n_k)  # [B', h', n_q]
        counts = counts.astype(_checks.compute_dtype(q4.dtype))
        row_scale = entropy_invariant_scale(counts, entropy_base=base) / math.sqrt(d)
    else:  # the same scale for every query, computed in Python as on the dense path
        if scale == "entropy_invariant":
            value = math.log(n_k) / math.log(base) / math.sqrt(d)
        else:
            value = 1.0 / math.sqrt(d) if scale == "standard" else float(scale)
        row_scale = jnp.full((1, 1, n_q), value, _checks.compute_dtype(q4.dtype))
    return blocked_attention.attention(
        q4, k4, v4, row_scale, structure,
        block_q=blocked_attention.DEFAULT_BLOCK_Q if block_q is None else block_q,
        block_k=blocked_attention.DEFAULT_BLOCK_K if block_k is None else block_k)


#: On CPU, attention over at least this many keys uses the blocked implementation by
#: default. From `python -m benchmarks.attention` (2 cores; forward + backward, 4 heads
#: of 64, causal / bidirectional): blocked takes 0.64x / 0.64x of dense time at 128
#: keys, 0.78x / 0.64x at 512, 0.11x / 0.29x at 4096; below 128 both take a few
#: milliseconds at most and the ratio is noise (0.26x-2.79x at 64). The `lm_stdlib`
#: train step is 0.98x at its
#: default 16 x 128 and 0.38x at 1 x 2048 (benchmarks/RESULTS.md).
CPU_BLOCKED_MIN_KEYS = 128


def default_implementation(n_k: int) -> str | None:
    """The implementation `implementation=None` resolves to for `n_k` keys.

    ``"blocked"`` on CPU for `n_k ≥ CPU_BLOCKED_MIN_KEYS`; otherwise None, which leaves
    the choice to `jax.nn.dot_product_attention` (XLA, or cuDNN's fused kernel where it
    applies).
    """
    if jax.default_backend() == "cpu" and n_k >= CPU_BLOCKED_MIN_KEYS:
        return "blocked"
    return None
