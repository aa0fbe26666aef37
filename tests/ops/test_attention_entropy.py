"""`ops.attention_entropy` against a float64 NumPy loop; its bounds and defining cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue.ops.attention import attention_entropy
from kexue.ops.masks import AttentionMask


def entropy_reference(q, k, mask, scale, entropy_base=512.0):
    """Float64 loop over (batch, head, query): −Σ p log p of the softmax over the visible
    keys (`mask` `[b, h, n_q, n_k]`, True = visible); 0 where no key is visible."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, n_q, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, n_q, h))
    for i in range(b):
        for head in range(h):
            for row in range(n_q):
                visible = np.flatnonzero(mask[i, head, row])
                if visible.size == 0:
                    continue
                if scale == "standard":
                    kappa = 1 / math.sqrt(d)
                elif scale == "entropy_invariant":
                    kappa = math.log(visible.size) / math.log(entropy_base) / math.sqrt(d)
                else:
                    kappa = scale
                z = kappa * (k[i, visible, head // group] @ q[i, row, head])
                p = np.exp(z - z.max())
                p /= p.sum()
                out[i, row, head] = -np.sum(p * np.log(p))
    return out


@pytest.mark.parametrize("scale", ["standard", "entropy_invariant", 0.7])
@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_matches_float64_reference_with_bool_mask(scale, h_kv):
    rng = np.random.default_rng()
    b, n_q, n_k, h, d = 2, 6, 9, 4, 8
    q = rng.normal(size=(b, n_q, h, d)).astype(np.float32) * 2
    k = rng.normal(size=(b, n_k, h_kv, d)).astype(np.float32) * 2
    mask = rng.random((b, n_q, n_k)) < 0.6
    mask[0, 2] = False  # a query that sees nothing
    got = jax.jit(lambda q, k, m: attention_entropy(q, k, mask=m, scale=scale))(q, k, mask)
    want = entropy_reference(q, k, np.broadcast_to(mask[:, None], (b, h, n_q, n_k)), scale)
    assert got.shape == (b, n_q, h) and got.dtype == jnp.float32
    # float32 logits of size ~10 carry ~1e-6 rounding, so H is good to ~1e-5.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(got)[0, 2] == 0.0)


def test_structured_mask_is_read_as_its_dense_form():
    rng = np.random.default_rng()
    b, n, h, d = 2, 7, 2, 4
    q, k = (rng.normal(size=(b, n, h, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, n), bool)
    valid[1, 5:] = False
    got = attention_entropy(q, k, mask=AttentionMask(valid=valid, causal=True),
                            scale="entropy_invariant")
    dense = np.tril(np.ones((n, n), bool))[None] & valid[:, None, :] & valid[:, :, None]
    want = entropy_reference(q, k, np.broadcast_to(dense[:, None], (b, h, n, n)),
                             "entropy_invariant")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_uniform_attention_has_entropy_log_of_visible_keys():
    """q = 0 makes every visible key equally likely: H = log(number of visible keys)."""
    n, h, d = 12, 3, 4
    k = np.random.default_rng().normal(size=(1, n, h, d)).astype(np.float32)
    for scale in ("standard", "entropy_invariant"):
        got = attention_entropy(np.zeros((1, n, h, d), np.float32), k,
                                mask=AttentionMask(causal=True), scale=scale)
        want = np.log(np.arange(1, n + 1))[:, None] * np.ones((1, h))
        np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-6, atol=1e-6)


def test_entropy_lies_between_zero_and_log_n_and_falls_as_logits_sharpen():
    rng = np.random.default_rng()
    n, h, d = 32, 2, 8
    q, k = (rng.normal(size=(2, n, h, d)).astype(np.float32) for _ in range(2))
    values = [np.asarray(attention_entropy(q, k, scale=s)) for s in (0.1, 1.0, 10.0)]
    for value in values:
        assert np.all(value >= 0) and np.all(value <= math.log(n) + 1e-5)
    assert np.all(values[0] > values[1]) and np.mean(values[1]) > np.mean(values[2])


def test_entropy_invariant_scale_keeps_entropy_flatter_over_lengths():
    """The defining claim, on keys with a fixed logit distribution: with the standard
    scale the entropy grows by about log(4) from n to 4n; the log_b(n) factor sharpens
    the logits as n grows, so it grows less."""
    rng = np.random.default_rng(0)
    d, h = 16, 4

    def mean_entropy(n, scale):
        q = rng.normal(size=(4, n, h, d)).astype(np.float32) * 1.5
        k = rng.normal(size=(4, n, h, d)).astype(np.float32) * 1.5
        return float(np.mean(attention_entropy(q, k, scale=scale, entropy_base=64)))

    growth = {s: mean_entropy(1024, s) - mean_entropy(64, s)
              for s in ("standard", "entropy_invariant")}
    assert growth["entropy_invariant"] < growth["standard"]


def test_bad_arguments_name_the_argument():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="`q` and `k` must have the same dtype"):
        attention_entropy(q, jnp.zeros((1, 4, 2, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="scale"):
        attention_entropy(q, q, scale="sharp")
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        attention_entropy(np.zeros((1, 4, 3, 8), np.float32), q)
    with pytest.raises(ValueError, match="mask"):
        attention_entropy(q, q, mask=np.ones((5, 5), bool))
