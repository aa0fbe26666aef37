"""Blocked attention against a float64 NumPy oracle: outputs and gradients, every mask kind.

The oracle builds the boolean mask from the structured parts in NumPy, computes softmax
attention in float64 and its gradient by the softmax-Jacobian formulas (checked once
against central differences); it shares no code with `kexue.ops`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue import ops
from kexue.ops import attention as attention_module
from kexue.ops import blocked_attention
from kexue.ops.masks import AttentionMask

F32 = {"rtol": 2e-5, "atol": 2e-5}


# ----------------------------------------------------------------------------- oracle


def oracle_mask(batch, h, n_q, n_k, *, valid=None, kv_valid=None, causal=False,
                q_offset=None, prefix=None, mask=None):
    """bool `[B, h, n_q, n_k]` from the structured parts (the documented semantics)."""
    full = np.ones((batch, h, n_q, n_k), bool)
    if valid is not None:
        full &= np.broadcast_to(np.asarray(valid, bool), (batch, n_q))[:, None, :, None]
        if kv_valid is None and n_q == n_k:
            kv_valid = valid
    if kv_valid is not None:
        full &= np.broadcast_to(np.asarray(kv_valid, bool), (batch, n_k))[:, None, None, :]
    if causal:
        offset = n_k - n_q if q_offset is None else q_offset
        offset = np.broadcast_to(np.asarray(offset), (batch,))
        i = np.arange(n_q)[None, :, None]
        j = np.arange(n_k)[None, None, :]
        visible = j <= i + offset[:, None, None]
        if prefix is not None:
            visible = visible | (j < np.broadcast_to(np.asarray(prefix), (batch,))[:, None, None])
        full &= visible[:, None]
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.ndim == 3:  # [B, n_q, n_k], shared by the heads
            mask = mask[:, None]
        full &= np.broadcast_to(mask, full.shape)
    return full


def oracle(q, k, v, full_mask, scale, entropy_base, cotangent):
    """Float64 attention output and gradients `(out, dq, dk, dv)` of `Σ cotangent·out`.

    q `[B, n_q, h, d]`, k/v `[B, n_k, h_kv, d]`, full_mask `[B, h, n_q, n_k]`.
    """
    q, k, v, w = (np.asarray(t, np.float64) for t in (q, k, v, cotangent))
    batch, _, h, d = q.shape
    group = h // k.shape[2]
    kk = np.repeat(k, group, axis=2).transpose(0, 2, 1, 3)  # [B, h, n_k, d]
    vv = np.repeat(v, group, axis=2).transpose(0, 2, 1, 3)
    qq = q.transpose(0, 2, 1, 3)  # [B, h, n_q, d]
    counts = full_mask.sum(-1)  # [B, h, n_q]
    if scale == "standard":
        kappa = np.full(counts.shape, 1 / math.sqrt(d))
    elif scale == "entropy_invariant":
        kappa = np.log(np.maximum(counts, 1)) / math.log(entropy_base) / math.sqrt(d)
    else:
        kappa = np.full(counts.shape, float(scale))
    logits = kappa[..., None] * (qq @ kk.transpose(0, 1, 3, 2))
    logits = np.where(full_mask, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(full_mask, np.exp(logits - row_max), 0.0)
    norm = weights.sum(-1, keepdims=True)
    p = np.where(norm > 0, weights / np.where(norm > 0, norm, 1), 0.0)
    out = p @ vv  # [B, h, n_q, d]
    dout = w.transpose(0, 2, 1, 3)
    dp = dout @ vv.transpose(0, 1, 3, 2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    dq = (kappa[..., None] * ds) @ kk
    dk_h = (kappa[..., None] * ds).transpose(0, 1, 3, 2) @ qq
    dv_h = p.transpose(0, 1, 3, 2) @ dout

    def fold(x):  # [B, h, n_k, d] -> [B, n_k, h_kv, d], summing each group of heads
        x = x.transpose(0, 2, 1, 3)
        return x.reshape(batch, x.shape[1], h // group, group, d).sum(3)

    return out.transpose(0, 2, 1, 3), dq.transpose(0, 2, 1, 3), fold(dk_h), fold(dv_h)


def test_oracle_gradient_matches_central_differences(rng):
    q, k, v = (rng.standard_normal(s) for s in ((1, 4, 2, 3), (1, 5, 1, 3), (1, 5, 1, 3)))
    mask = oracle_mask(1, 2, 4, 5, causal=True, kv_valid=np.array([[1, 1, 0, 1, 1]]))
    w = rng.standard_normal(q.shape)
    _, *grads = oracle(q, k, v, mask, "entropy_invariant", 8.0, w)
    eps = 1e-6
    for i, grad in enumerate(grads):
        direction = rng.standard_normal(grad.shape)
        args_plus = [q, k, v]
        args_minus = [q, k, v]
        args_plus[i] = args_plus[i] + eps * direction
        args_minus[i] = args_minus[i] - eps * direction
        numeric = (np.sum(w * oracle(*args_plus, mask, "entropy_invariant", 8.0, w)[0])
                   - np.sum(w * oracle(*args_minus, mask, "entropy_invariant", 8.0, w)[0]))
        np.testing.assert_allclose(np.sum(grad * direction), numeric / (2 * eps), rtol=1e-6)


# ----------------------------------------------------------------------------- cases


def structured_case(kind, rng, batch, h, n_q, n_k):
    """`(AttentionMask, oracle_mask keyword arguments)` for a mask kind."""
    lengths = rng.integers(1, n_k + 1, size=(batch, 1))
    ragged = np.arange(n_k)[None, :] < lengths  # real tokens first, padding at the end
    if kind == "none":
        parts = {}
    elif kind == "padding":  # includes a fully padded sequence and a padded first query
        valid = ragged.copy()
        valid[0, 0] = False
        valid[-1] = False
        parts = {"valid": valid}
    elif kind == "key_padding":
        parts = {"kv_valid": rng.random((batch, n_k)) < 0.6}
    elif kind == "causal":
        parts = {"causal": True}
    elif kind == "causal_ragged":
        parts = {"causal": True, "valid": ragged}
    elif kind == "prefix_lm":
        parts = {"causal": True, "valid": ragged,
                 "prefix": rng.integers(0, n_q + 1, size=batch).astype(np.int32)}
    elif kind == "bool_per_head":  # a general mask on top of padding
        parts = {"valid": ragged, "mask": rng.random((batch, h, n_q, n_k)) < 0.5}
    elif kind == "bool_shared_causal":
        parts = {"causal": True, "mask": rng.random((batch, n_q, n_k)) < 0.7}
    else:
        raise AssertionError(kind)
    structure = AttentionMask(valid=parts.get("valid"), kv_valid=parts.get("kv_valid"),
                              causal=parts.get("causal", False),
                              prefix_lengths=parts.get("prefix"), mask=parts.get("mask"))
    return structure, parts


def random_qkv(rng, batch, n_q, n_k, h, h_kv, d, dtype=np.float32):
    return (rng.standard_normal((batch, n_q, h, d)).astype(dtype),
            rng.standard_normal((batch, n_k, h_kv, d)).astype(dtype),
            rng.standard_normal((batch, n_k, h_kv, d)).astype(dtype))


def blocked_value_and_grads(q, k, v, mask, scale, w, *, block_q, block_k, entropy_base):
    def loss(q, k, v):
        out = ops.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        entropy_base=entropy_base, implementation="blocked",
                                        block_q=block_q, block_k=block_k)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return out, grads


KINDS = ["none", "padding", "key_padding", "causal", "causal_ragged", "prefix_lm",
         "bool_per_head", "bool_shared_causal"]


@pytest.mark.parametrize("scale", ["standard", "entropy_invariant", 0.37])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_match_the_oracle(rng, kind, scale):
    # Ragged: 37 queries/keys in blocks of 8 x 16 (neither divides 37); GQA 4 -> 2 heads.
    batch, n, h, h_kv, d = 3, 37, 4, 2, 8
    q, k, v = random_qkv(rng, batch, n, n, h, h_kv, d)
    structure, parts = structured_case(kind, rng, batch, h, n, n)
    w = rng.standard_normal(q.shape).astype(np.float32)
    out, grads = blocked_value_and_grads(q, k, v, structure, scale, w, block_q=8, block_k=16,
                                         entropy_base=16.0)
    mask = oracle_mask(batch, h, n, n, **parts)
    expected = oracle(q, k, v, mask, scale, 16.0, w)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected[0], **F32)
    for got, want in zip(grads, expected[1:], strict=True):
        np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize(("h", "h_kv"), [(6, 6), (6, 3), (6, 1)])
def test_grouped_query_heads_and_decoding_offsets(rng, h, h_kv):
    """GQA/MQA, and queries placed at per-sequence offsets among more keys (decoding)."""
    batch, n_q, n_k, d = 2, 5, 23, 8
    q, k, v = random_qkv(rng, batch, n_q, n_k, h, h_kv, d)
    offset = rng.integers(0, n_k - n_q + 1, size=batch).astype(np.int32)
    structure = AttentionMask(causal=True, q_offset=offset)
    w = rng.standard_normal(q.shape).astype(np.float32)
    out, grads = blocked_value_and_grads(q, k, v, structure, "entropy_invariant", w,
                                         block_q=2, block_k=4, entropy_base=512.0)
    mask = oracle_mask(batch, h, n_q, n_k, causal=True, q_offset=offset)
    expected = oracle(q, k, v, mask, "entropy_invariant", 512.0, w)
    np.testing.assert_allclose(out, expected[0], **F32)
    for got, want in zip(grads, expected[1:], strict=True):
        np.testing.assert_allclose(got, want, **F32)


def test_traced_offset_under_jit(rng):
    """`q_offset` may be traced (the cache index inside a decoding step)."""
    q, k, v = random_qkv(rng, 1, 3, 19, 2, 1, 4)

    @jax.jit
    def step(q, k, v, index):
        return ops.dot_product_attention(q, k, v, mask=AttentionMask(causal=True, q_offset=index),
                                         scale="entropy_invariant", implementation="blocked",
                                         block_q=2, block_k=4)

    for index in rng.choice(17, size=3, replace=False):
        mask = oracle_mask(1, 2, 3, 19, causal=True, q_offset=int(index))
        expected = oracle(q, k, v, mask, "entropy_invariant", 512.0, np.zeros(q.shape))[0]
        np.testing.assert_allclose(step(q, k, v, jnp.int32(index)), expected, **F32)


def test_fully_padded_rows_are_zero_with_zero_gradients(rng):
    batch, n, h, d = 2, 20, 2, 4
    q, k, v = random_qkv(rng, batch, n, n, h, h, d)
    valid = np.zeros((batch, n), bool)
    valid[0, :7] = True  # sequence 1 is all padding
    w = rng.standard_normal(q.shape).astype(np.float32)
    for scale in ("standard", "entropy_invariant"):
        out, grads = blocked_value_and_grads(q, k, v, AttentionMask(valid=valid, causal=True),
                                             scale, w, block_q=4, block_k=8, entropy_base=512.0)
        out = np.asarray(out)
        np.testing.assert_array_equal(out[0, 7:], 0.0)
        np.testing.assert_array_equal(out[1], 0.0)
        for g in grads:
            assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(np.asarray(grads[0])[0, 7:], 0.0)  # padded queries
        np.testing.assert_array_equal(np.asarray(grads[1])[0, 7:], 0.0)  # keys nobody sees
        np.testing.assert_array_equal(np.asarray(grads[2])[1], 0.0)


@pytest.mark.parametrize("kind", ["causal_ragged", "prefix_lm", "bool_per_head"])
def test_bfloat16_within_its_tolerance(rng, kind):
    """bf16 inputs, float32 accumulation: within bf16 rounding of the float64 oracle on
    the same (bf16-rounded) inputs; the output stays bf16."""
    batch, n, h, h_kv, d = 2, 45, 4, 2, 16
    q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(rng, batch, n, n, h, h_kv, d))
    structure, parts = structured_case(kind, rng, batch, h, n, n)
    w = rng.standard_normal(q.shape).astype(np.float32)
    out, grads = blocked_value_and_grads(q, k, v, structure, "entropy_invariant", w,
                                         block_q=16, block_k=8, entropy_base=32.0)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    expected = oracle(*f32, oracle_mask(batch, h, n, n, **parts), "entropy_invariant", 32.0, w)
    for got, want in zip((out, *grads), expected, strict=True):
        got = np.asarray(got, np.float64)
        scale = np.max(np.abs(want)) + 1e-6
        assert np.max(np.abs(got - want)) <= 2.5e-2 * scale, (np.max(np.abs(got - want)), scale)


@pytest.mark.parametrize("kind", KINDS)
def test_blocked_equals_dense_implementation(rng, kind):
    batch, n, h, h_kv, d = 2, 33, 4, 1, 8
    q, k, v = random_qkv(rng, batch, n, n, h, h_kv, d)
    structure, _ = structured_case(kind, rng, batch, h, n, n)
    dense = ops.dot_product_attention(q, k, v, mask=structure, scale="entropy_invariant",
                                      implementation="xla")
    blocked = ops.dot_product_attention(q, k, v, mask=structure, scale="entropy_invariant",
                                        implementation="blocked", block_q=8, block_k=8)
    np.testing.assert_allclose(blocked, dense, **F32)


def test_plain_boolean_mask_is_accepted(rng):
    """A bool `[..., n_q, n_k]` mask (not an `AttentionMask`) works with blocked too."""
    q, k, v = random_qkv(rng, 2, 9, 11, 2, 2, 4)
    mask = rng.random((2, 9, 11)) < 0.5
    got = ops.dot_product_attention(q, k, v, mask=mask, implementation="blocked",
                                    block_q=4, block_k=4)
    expected = oracle(q, k, v, oracle_mask(2, 2, 9, 11, mask=mask), "standard", 512.0,
                      np.zeros(q.shape))[0]
    np.testing.assert_allclose(got, expected, **F32)


# ---------------------------------------------------------------- structure, skipping


@pytest.mark.parametrize("kind", KINDS)
def test_visible_counts_equal_the_mask_row_sums(rng, kind):
    batch, h, n = 3, 2, 29
    structure, parts = structured_case(kind, rng, batch, h, n, n)
    q_shape = (batch, n, h, 4)
    dense = None
    if structure.mask is not None:
        dense = attention_module._prepare_mask(structure.mask, q_shape, n)
    flat = blocked_attention.flatten_mask(structure, q_shape, n, dense)
    counts = np.asarray(blocked_attention.visible_counts(flat, n, n))
    expected = oracle_mask(batch, h, n, n, **parts).sum(-1)
    np.testing.assert_array_equal(np.broadcast_to(counts, expected.shape), expected)


def test_key_block_ranges_skip_the_upper_triangle_and_padding():
    n, block = 64, 16
    flat = blocked_attention.flatten_mask(AttentionMask(causal=True), (1, n, 1, 4), n, None)
    lo, hi = blocked_attention._key_block_ranges(flat, n, n, block, block, None)
    np.testing.assert_array_equal(lo, [0, 0, 0, 0])
    np.testing.assert_array_equal(hi, [1, 2, 3, 4])  # 10 of 16 blocks: the diagonal and below
    # Two sequences padded after 20 and 33 tokens: key blocks past 33 are never visited,
    # and the last query block (rows 48-63, all padding) visits none.
    valid = np.arange(n)[None, :] < np.array([[20], [33]])
    flat = blocked_attention.flatten_mask(AttentionMask(valid=valid), (2, n, 1, 4), n, None)
    lo, hi = blocked_attention._key_block_ranges(flat, n, n, block, block, None)
    np.testing.assert_array_equal(hi - lo, [3, 3, 3, 0])


def test_backward_memory_is_linear_in_length():
    """Compiled temporaries of value-and-grad grow about linearly with n (dense: n²) and
    stay far below one `[h, n, n]` float32 score tensor."""
    h, d = 4, 32

    def temp_bytes(n, implementation):
        shape = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)

        def loss(q, k, v):
            out = ops.dot_product_attention(q, k, v, mask=AttentionMask(causal=True),
                                            implementation=implementation)
            return jnp.sum(out)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    blocked = [temp_bytes(n, "blocked") for n in (2048, 4096)]
    assert blocked[1] < 2.5 * blocked[0], blocked
    assert blocked[1] < 0.25 * h * 4096 * 4096 * 4, blocked
    dense = [temp_bytes(n, "xla") for n in (1024, 2048)]
    assert dense[1] > 3 * dense[0], dense


# ----------------------------------------------------------------------------- errors


def test_default_implementation_rule():
    threshold = attention_module.CPU_BLOCKED_MIN_KEYS
    if jax.default_backend() == "cpu":
        assert attention_module.default_implementation(threshold) == "blocked"
        assert attention_module.default_implementation(threshold - 1) is None
    else:
        assert attention_module.default_implementation(threshold) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"implementation": "flash"}, r"`implementation` must be one of"),
    ({"implementation": "blocked", "block_q": 0}, r"`block_q` must be a positive"),
    ({"implementation": "xla", "block_k": 8}, r"`block_q` and `block_k` apply to"),
    ({"mask": AttentionMask(prefix_lengths=np.array([1, 2]))},
     r"`mask.prefix_lengths` needs `mask.causal=True`"),
    ({"mask": AttentionMask(valid=np.ones((2, 5), bool))}, r"`mask.valid` must have shape"),
    ({"mask": AttentionMask(kv_valid=np.ones((3, 6), bool))},
     r"`mask.kv_valid.shape\[:-1\]` with shape \(3,\) does not broadcast"),
    ({"mask": AttentionMask(causal=True, q_offset=np.ones(2, np.float32))},
     r"`mask.q_offset` must have a integer dtype"),
    ({"mask": AttentionMask(causal=1)}, r"`mask.causal` must be a Python bool"),
])
def test_errors_name_the_argument(kwargs, match):
    q = np.zeros((2, 4, 2, 4), np.float32)
    k = np.zeros((2, 6, 2, 4), np.float32)
    with pytest.raises(ValueError, match=match):
        ops.dot_product_attention(q, k, k, **kwargs)
