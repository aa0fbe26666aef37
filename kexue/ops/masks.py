"""Boolean attention masks: padding, causal, prefix-LM (UniLM), and their combination.

A mask is a boolean array `[..., q_len, k_len]` where `True` means "query `i` may attend
to key `j`" (kexue.fm/archives/8475). Masks combine by logical AND, so padding and
causality compose with `combine_masks`. `kexue.ops.attention.dot_product_attention`
accepts any of them, counts the visible keys per query from the mask (entropy-invariant
scale) and returns zeros for a query that sees no key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops import _checks

__all__ = ["causal_mask", "combine_masks", "padding_mask", "prefix_lm_mask"]


def _check_length(name: str, value) -> int:
    """A sequence length: a positive Python int (static, so masks have static shapes)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"`{name}` must be a Python int; got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be positive; got {value}.")
    return int(value)


def _as_bool(name: str, valid) -> jax.Array:
    valid = jnp.asarray(valid)
    _checks.check_min_rank(name, valid, 1, "[..., n]")
    _checks.check_dtype_kind(name, valid, ("bool", "integer"))
    return valid if valid.dtype == jnp.bool_ else valid != 0


def padding_mask(valid, kv_valid=None) -> jax.Array:
    """Mask from per-token validity: query `i` sees key `j` iff both are real tokens.

    `mask[..., i, j] = valid[..., i] AND kv_valid[..., j]`. Padded query rows are fully
    masked, so attention returns zeros for them.

    Args:
      valid: `[..., n_q]` bool (or integer, nonzero = valid) validity of the queries.
      kv_valid: `[..., n_k]` validity of the keys; None means `valid` (self-attention).
        Its leading axes must broadcast against those of `valid`.

    Returns:
      bool array `[..., n_q, n_k]` (leading axes broadcast).
    """
    q_valid = _as_bool("valid", valid)
    k_valid = q_valid if kv_valid is None else _as_bool("kv_valid", kv_valid)
    _checks.check_broadcastable("valid.shape[:-1]", q_valid.shape[:-1],
                                "kv_valid.shape[:-1]", k_valid.shape[:-1])
    return q_valid[..., :, None] & k_valid[..., None, :]


def causal_mask(q_len: int, k_len: int | None = None, *,
                offset: int | None = None) -> jax.Array:
    """Causal (autoregressive) mask: query `i` sees key `j` iff `j <= i + offset`.

    With `offset=None` the queries are taken to be the last `q_len` of the `k_len`
    positions (`offset = k_len − q_len`), which is what decoding with a key/value cache
    needs; for `q_len == k_len` this is the usual lower-triangular mask.

    Args:
      q_len: number of queries (positive int).
      k_len: number of keys (positive int); None means `q_len`.
      offset: position of query 0 relative to key 0 (int, may be negative); None means
        `k_len − q_len`.

    Returns:
      bool array `[q_len, k_len]` (a constant under `jax.jit`).
    """
    q_len = _check_length("q_len", q_len)
    k_len = q_len if k_len is None else _check_length("k_len", k_len)
    if offset is None:
        offset = k_len - q_len
    elif isinstance(offset, bool) or not isinstance(offset, int | np.integer):
        raise ValueError(f"`offset` must be a Python int or None; got {offset!r}.")
    rows = np.arange(q_len)[:, None] + int(offset)
    return jnp.asarray(np.arange(k_len)[None, :] <= rows)


def prefix_lm_mask(prefix_lengths, seq_len: int) -> jax.Array:
    """Prefix-LM ("UniLM seq2seq") mask: the prefix is bidirectional, the rest causal.

    Key `j` is visible to query `i` iff `j < prefix_length` or `j <= i`: every token sees
    the whole prefix (source), and target tokens also see the targets up to themselves.
    A prefix length of 0 gives the causal mask, one of `seq_len` the full mask
    (kexue.fm/archives/8475; UniLM).

    Args:
      prefix_lengths: integer array `[...]` (a scalar for one sequence): the length of
        the prefix of each sequence.
      seq_len: sequence length `n` (positive int).

    Returns:
      bool array `[..., n, n]`.
    """
    prefix_lengths = jnp.asarray(prefix_lengths)
    _checks.check_dtype_kind("prefix_lengths", prefix_lengths, ("integer",))
    seq_len = _check_length("seq_len", seq_len)
    prefix = prefix_lengths[..., None, None]
    positions = np.arange(seq_len)
    causal = positions[None, :] <= positions[:, None]
    return jnp.asarray(causal) | (jnp.asarray(positions)[None, :] < prefix)


def combine_masks(*masks) -> jax.Array | None:
    """Logical AND of boolean masks with broadcasting; `None` entries are skipped.

    Args:
      *masks: bool arrays (e.g. `[..., q_len, k_len]`) whose shapes broadcast together,
        or None.

    Returns:
      The broadcast AND of the non-None masks, or None when all are None (so "no mask"
      stays cheap all the way to the attention kernel).
    """
    present = [(i, jnp.asarray(m)) for i, m in enumerate(masks) if m is not None]
    if not present:
        return None
    shape: tuple[int, ...] | None = None
    for i, m in present:
        _checks.check_dtype_kind(f"masks[{i}]", m, ("bool",))
        if shape is None:
            shape = _checks.shape_of(m)
        else:
            shape = _checks.check_broadcastable("the preceding masks", shape,
                                                f"masks[{i}]", _checks.shape_of(m))
    result = present[0][1]
    for _, m in present[1:]:
        result = result & m
    return result
