"""Boolean attention masks: padding, causal, prefix-LM (UniLM), and their combination.

A mask is a boolean array `[..., q_len, k_len]` where `True` means "query `i` may attend
to key `j`" (kexue.fm/archives/8475). Masks combine by logical AND, so padding and
causality compose with `combine_masks`. `kexue.ops.attention.dot_product_attention`
accepts any of them, counts the visible keys per query from the mask (entropy-invariant
scale) and returns zeros for a query that sees no key.

`AttentionMask` is the same information in structured form (token validity, a causal
flag with its offset, prefix lengths, and optionally a boolean mask on top): `O(n)`
arrays instead of `O(n²)`, from which blocked attention skips whole blocks and counts the
visible keys per query without building the `[q_len, k_len]` mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops import _checks

__all__ = ["AttentionMask", "causal_mask", "combine_masks", "padding_mask", "prefix_lm_mask"]


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, in structured form; pass it as `mask=` to attention.

    Query `i` may attend to key `j` iff all of the given parts allow it:

    * `valid[..., i]` and `kv_valid[..., j]` (padding, as `padding_mask`);
    * with `causal`: `j <= i + q_offset`, or `j < prefix_lengths` (prefix-LM: the prefix
      is visible to every query, as `prefix_lm_mask`);
    * `mask[..., i, j]` (any boolean mask, as `dot_product_attention` reads it).

    `dot_product_attention(q, k, v, mask=AttentionMask(...))` gives exactly what the
    equivalent boolean mask gives. The dense implementations build that mask; the blocked
    one (``implementation="blocked"``) reads the parts directly: it counts each query's
    visible keys (entropy-invariant scale) in `O(n)`, and skips key blocks above the
    causal diagonal and blocks made only of padding. A model passes its structure here
    rather than a combined `[b, n, n]` mask.

    Attributes:
      valid: bool (or integer, nonzero = real token) `[..., n_q]` query validity; a
        padded query sees nothing and gets zeros. None: all valid.
      kv_valid: bool (or integer) `[..., n_k]` key validity. None means `valid` when
        that is given and `n_q == n_k` (self-attention), else all keys valid.
      causal: static Python bool: query `i` sees keys `j <= i + q_offset`.
      q_offset: position of query 0 among the keys: a Python int, or an integer array
        of shape `[...]` (one per sequence) that may be traced, e.g. the cache index
        when decoding. None means `n_k − n_q` (the queries are the last `n_q`
        positions, as in `causal_mask`). Only read with `causal`.
      prefix_lengths: integer `[...]` prefix length per sequence (prefix-LM / UniLM,
        kexue.fm/archives/8475); needs `causal=True`.
      mask: optional bool `[..., n_q, n_k]` (shared by the heads) or `[..., h, n_q, n_k]`
        ANDed with the rest; it costs `O(n²)` memory, so the blocked implementation
        uses it for correctness, not for long sequences.

    The leading axes `...` of every part broadcast against the batch axes of `q`. The
    class is a pytree (arrays are leaves, `causal` is static), so it passes through
    `jax.jit`, `jax.checkpoint` and `nnx` modules as one argument.
    """

    valid: jax.Array | None = None
    kv_valid: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata={"static": True})
    q_offset: jax.Array | int | None = None
    prefix_lengths: jax.Array | None = None
    mask: jax.Array | None = None
