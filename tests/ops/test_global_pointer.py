"""GlobalPointer and Efficient GlobalPointer logits, span encodings, decoding and span F1.

References are float64 NumPy loops written here (their own RoPE, not `kexue.ops.rope`).
"""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kexue.ops import _checks
from kexue.ops.global_pointer import (
    decode_spans,
    efficient_global_pointer_logits,
    f1_from_counts,
    global_pointer_logits,
    span_f1,
    spans_to_dense,
    spans_to_flat,
)
from kexue.ops.losses import sparse_zlpr_loss, zlpr_loss
from tests.ops._variants import OpsTestCase

NEG32 = np.float32(_checks.large_negative(jnp.float32))


def variant_ops(variant) -> SimpleNamespace:
    """The ops through a chex variant (`self.variant`: under `jax.jit`, or eagerly)."""
    return SimpleNamespace(
        global_pointer_logits=variant(global_pointer_logits,
                                      static_argnames=("rope", "base", "layout")),
        efficient_global_pointer_logits=variant(efficient_global_pointer_logits,
                                                static_argnames=("rope", "base", "layout")),
        decode_spans=variant(decode_spans, static_argnames="max_spans"),
        spans_to_flat=variant(spans_to_flat, static_argnums=(1, 2)),
        spans_to_dense=variant(spans_to_dense, static_argnums=(1, 2)),
        span_f1=variant(span_f1),
        f1_from_counts=variant(f1_from_counts),
        sparse_zlpr_loss=variant(sparse_zlpr_loss),
        zlpr_loss=variant(zlpr_loss, static_argnames="axis"),
    )


def rope_ref(x: np.ndarray, layout: str, base: float = 10000.0) -> np.ndarray:
    """Rotate `x [n, d]` at positions 0…n−1, pair by pair, in float64."""
    n, d = x.shape
    out = np.array(x, dtype=np.float64)
    for m in range(n):
        for i in range(d // 2):
            angle = m * base ** (-2.0 * i / d)
            a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + d // 2)
            xa, xb = float(x[m, a]), float(x[m, b])
            out[m, a] = xa * np.cos(angle) - xb * np.sin(angle)
            out[m, b] = xa * np.sin(angle) + xb * np.cos(angle)
    return out


def gp_ref(q, k, valid, rope, layout):
    """`[B, T, n, n]` reference logits; impossible spans are marked False in `exists`."""
    batch, n, types, d = q.shape
    out = np.zeros((batch, types, n, n))
    exists = np.zeros((batch, types, n, n), dtype=bool)
    for b in range(batch):
        for t in range(types):
            qt, kt = q[b, :, t].astype(np.float64), k[b, :, t].astype(np.float64)
            if rope:
                qt, kt = rope_ref(qt, layout), rope_ref(kt, layout)
            for i in range(n):
                for j in range(n):
                    out[b, t, i, j] = qt[i] @ kt[j] / np.sqrt(d)
                    exists[b, t, i, j] = j >= i and bool(valid[b, i]) and bool(valid[b, j])
    return out, exists


def random_valid(rng, batch, n):
    lengths = rng.integers(1, n + 1, size=batch)
    lengths[0] = n
    return np.arange(n)[None, :] < lengths[:, None]


def test_global_pointer_bfloat16(rng):
    q = rng.normal(size=(2, 4, 2, 8)).astype(np.float32)
    k = rng.normal(size=(2, 4, 2, 8)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=np.int32)
    got = global_pointer_logits(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                                valid=valid)
    assert got.dtype == jnp.bfloat16
    want, exists = gp_ref(q, k, valid, True, "interleaved")
    got32 = np.asarray(got.astype(jnp.float32))
    np.testing.assert_allclose(got32[exists], want[exists], rtol=0.05, atol=0.1)
    assert np.all(np.isfinite(got32))
    np.testing.assert_array_equal(got32[~exists], float(jnp.bfloat16(
        _checks.large_negative(jnp.bfloat16))))


def test_global_pointer_jit_vmap_grad(rng):
    batch, n, types, d = 3, 4, 2, 4
    q = jnp.asarray(rng.normal(size=(batch, n, types, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, n, types, d)), jnp.float32)
    valid = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    eager = global_pointer_logits(q, k, valid=valid)
    np.testing.assert_allclose(jax.jit(global_pointer_logits)(q, k, valid=valid), eager,
                               rtol=1e-6, atol=1e-6)
    vmapped = jax.vmap(lambda a, b, c: global_pointer_logits(a, b, valid=c))(q, k, valid)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-6, atol=1e-6)

    gq, gk = jax.grad(lambda a, b: jnp.sum(global_pointer_logits(a, b, valid=valid)),
                      argnums=(0, 1))(q, k)
    assert np.all(np.isfinite(gq)) and np.all(np.isfinite(gk))
    # Padding tokens (and the fully padded third example) get no gradient.
    padded = ~np.asarray(valid)
    assert np.all(np.asarray(gq)[padded] == 0) and np.all(np.asarray(gk)[padded] == 0)
    assert np.any(np.asarray(gq)[~padded] != 0)


def egp_ref(q, k, bias_start, bias_end, valid):
    batch, n, d = q.shape
    types = bias_start.shape[-1]
    out = np.zeros((batch, types, n, n))
    exists = np.zeros_like(out, dtype=bool)
    for b in range(batch):
        qr, kr = rope_ref(q[b], "interleaved"), rope_ref(k[b], "interleaved")
        for t in range(types):
            for i in range(n):
                for j in range(n):
                    out[b, t, i, j] = (qr[i] @ kr[j] / np.sqrt(d)
                                       + (bias_start[b, i, t] + bias_end[b, j, t]) / 2)
                    exists[b, t, i, j] = j >= i and bool(valid[b, i]) and bool(valid[b, j])
    return out, exists


def test_efficient_global_pointer_bf16_jit_grad(rng):
    q, k = (jnp.asarray(rng.normal(size=(4, 4)), jnp.bfloat16) for _ in range(2))
    bs, be = (jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16) for _ in range(2))
    out = jax.jit(efficient_global_pointer_logits)(q, k, bs, be)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 4)
    grads = jax.grad(lambda *a: jnp.sum(efficient_global_pointer_logits(*a).astype(jnp.float32)),
                     argnums=(0, 1, 2, 3))(q, k, bs, be)
    assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
               for g in grads)
    # bias_end[j] enters the j-th column of the upper triangle: j+1 spans, weight ½ each.
    np.testing.assert_allclose(np.asarray(grads[3], np.float32),
                               np.broadcast_to((np.arange(4) + 1)[:, None] / 2, (4, 2)))


def decode_ref(logits, max_spans, threshold, valid=None):
    """Loop reference of `decode_spans` for one example `[types, n, n]`: the spans with
    `start ≤ end` (both ends valid) and logit > threshold, sorted by score, best first,
    ties by (type, start, end); padded to `max_spans`."""
    types, n, _ = logits.shape
    found = [(-float(logits[t, i, j]), t, i, j) for t in range(types) for i in range(n)
             for j in range(i, n) if float(logits[t, i, j]) > threshold
             and (valid is None or (valid[i] and valid[j]))]
    found.sort()
    rows = np.full((max_spans, 3), -1, np.int64)
    scores = np.full(max_spans, -np.inf)
    for r, (negative, t, i, j) in enumerate(found[:max_spans]):
        rows[r], scores[r] = (t, i, j), -negative
    return rows, scores, len(found)


def check_decoded(fn, logits, max_spans, threshold=0.0, valid=None):
    """`fn` (a `decode_spans`) against `decode_ref`, example by example."""
    spans, scores, count = fn(logits, max_spans=max_spans, threshold=threshold, valid=valid)
    lead = logits.shape[:-3]
    assert spans.shape == (*lead, max_spans, 3) and spans.dtype == jnp.int32
    assert scores.shape == (*lead, max_spans) and count.shape == lead
    assert count.dtype == jnp.int32
    for idx in np.ndindex(*lead):
        ok = None if valid is None else np.broadcast_to(valid, (*lead, logits.shape[-1]))[idx]
        rows, want, total = decode_ref(np.asarray(logits[idx], np.float64), max_spans,
                                       threshold, ok)
        np.testing.assert_array_equal(np.asarray(spans[idx]), rows, err_msg=str(idx))
        np.testing.assert_array_equal(np.asarray(scores[idx], np.float64),
                                      np.asarray(want, np.float32).astype(np.float64))
        assert int(count[idx]) == total
    return spans, scores, count


def test_decode_spans_threshold_may_be_traced(rng):
    logits = rng.normal(size=(2, 2, 5, 5)).astype(np.float32)
    fn = jax.jit(lambda x, t: decode_spans(x, max_spans=6, threshold=t))
    for threshold in (-0.3, 0.0, 1.2):
        want = decode_spans(logits, max_spans=6, threshold=threshold)
        got = fn(logits, threshold)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def random_span_rows(rng, lead, max_spans, types, n):
    """Rows `[*lead, P, 3]`: spans (some repeated), −1 rows anywhere, and rows that are
    not spans of `types` types in `n` tokens (unknown type, end < start, end ≥ n, −1 in
    one column). Some examples get no rows at all."""
    rows = np.full((int(np.prod(lead)), max_spans, 3), -1, np.int64)
    for r in range(rows.shape[0]):
        for p in range(int(rng.integers(0, max_spans + 1))):
            t, start = int(rng.integers(0, types)), int(rng.integers(0, n))
            end = int(rng.integers(start, n))
            kind = rng.random()
            if kind < 0.1:
                t = types + int(rng.integers(0, 3))
            elif kind < 0.2:
                start, end = end + 1, end
            elif kind < 0.3:
                end = n + int(rng.integers(0, 3))
            elif kind < 0.35:
                start = -1
            rows[r, p] = (t, start, end)
        if max_spans >= 2 and rng.random() < 0.5:
            rows[r, 1] = rows[r, 0]
        rng.shuffle(rows[r])
    return rows.reshape(*lead, max_spans, 3)


def is_span_ref(row, types, n):
    t, start, end = (int(x) for x in row)
    return 0 <= t < types and 0 <= start <= end < n


def flat_ref(rows, types, n):
    out = np.full(rows.shape[:-1], -1, np.int64)
    for idx in np.ndindex(*rows.shape[:-1]):
        if is_span_ref(rows[idx], types, n):
            t, start, end = (int(x) for x in rows[idx])
            out[idx] = t * n * n + start * n + end
    return out


def dense_ref(rows, types, n):
    out = np.zeros((*rows.shape[:-2], types, n, n), np.int64)
    for idx in np.ndindex(*rows.shape[:-2]):
        for row in rows[idx]:
            if is_span_ref(row, types, n):
                out[(*idx, *(int(x) for x in row))] = 1
    return out


def test_span_encodings_reject_bad_arguments():
    rows = np.zeros((2, 3, 3), np.int32)
    with pytest.raises(ValueError, match=r"`spans` must have a integer dtype"):
        spans_to_flat(rows.astype(np.float32), 2, 4)
    with pytest.raises(ValueError, match=r"`spans` must have size 3 on axis -1"):
        spans_to_dense(rows[..., :2], 2, 4)
    with pytest.raises(ValueError, match=r"`spans` must have at least 2 axes"):
        spans_to_flat(rows[0, 0], 2, 4)
    with pytest.raises(ValueError, match=r"`num_types` must be a positive Python int"):
        spans_to_flat(rows, 0, 4)
    with pytest.raises(ValueError, match=r"`seq_len` must be a positive Python int"):
        spans_to_dense(rows, 2, 4.0)
    with pytest.raises(ValueError, match=r"below 2\*\*31"):
        spans_to_flat(rows, 10, 2**14)


def counts_ref(logits, labels, valid, threshold):
    tp = fp = fn = 0
    batch, types, n, _ = logits.shape
    for b in range(batch):
        for t in range(types):
            for i in range(n):
                for j in range(n):
                    if valid is not None and not (j >= i and valid[b, i] and valid[b, j]):
                        continue
                    p, g = logits[b, t, i, j] > threshold, labels[b, t, i, j] > 0
                    tp += p and g
                    fp += p and not g
                    fn += g and not p
    return tp, fp, fn


class TestGlobalPointerJittedAndEager(OpsTestCase):
    """Each reference and property check runs under `jax.jit` and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((True, "interleaved"), (True, "half"), (False, "interleaved"))
    def test_global_pointer_matches_reference(self, rope, layout):
        v = variant_ops(self.variant)
        batch, n, types, d = 2, 5, 3, 8
        q = self.rng.normal(size=(batch, n, types, d)).astype(np.float32)
        k = self.rng.normal(size=(batch, n, types, d)).astype(np.float32)
        valid = random_valid(self.rng, batch, n)
        got = np.asarray(v.global_pointer_logits(q, k, valid=valid, rope=rope, layout=layout))
        want, exists = gp_ref(q, k, valid, rope, layout)
        assert got.shape == (batch, types, n, n) and got.dtype == np.float32
        np.testing.assert_allclose(got[exists], want[exists], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[~exists], NEG32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_pointer_without_valid_masks_lower_triangle(self):
        v = variant_ops(self.variant)
        q = self.rng.normal(size=(4, 2, 6)).astype(np.float32)  # unbatched [n, types, d]
        k = self.rng.normal(size=(4, 2, 6)).astype(np.float32)
        got = np.asarray(v.global_pointer_logits(q, k))
        want, exists = gp_ref(q[None], k[None], np.ones((1, 4), bool), True, "interleaved")
        assert got.shape == (2, 4, 4)
        np.testing.assert_allclose(got[exists[0]], want[0][exists[0]], rtol=1e-5, atol=1e-5)
        lower = np.tril(np.ones((4, 4), bool), -1)
        assert np.all(got[:, lower] == NEG32) and np.all(got[:, ~lower] > NEG32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_makes_logits_relative(self):
        """Shifting every token by `m` positions (a prefix in front) keeps the span logits."""
        v = variant_ops(self.variant)
        n, m, types, d = 5, 3, 2, 8
        q = self.rng.normal(size=(n, types, d)).astype(np.float32)
        k = self.rng.normal(size=(n, types, d)).astype(np.float32)
        prefix_q = self.rng.normal(size=(m, types, d)).astype(np.float32)
        prefix_k = self.rng.normal(size=(m, types, d)).astype(np.float32)
        for layout in ("interleaved", "half"):
            short = v.global_pointer_logits(q, k, layout=layout)
            long = v.global_pointer_logits(np.concatenate([prefix_q, q]),
                                           np.concatenate([prefix_k, k]), layout=layout)
            np.testing.assert_allclose(long[:, m:, m:], short, rtol=1e-4, atol=1e-4)
        # Same vector at every position: the logits depend on j − i only (Toeplitz).
        const = np.broadcast_to(self.rng.normal(size=(1, 1, d)), (n, 1, d)).astype(np.float32)
        logits = np.asarray(v.global_pointer_logits(const, const))[0]
        for offset in range(n):
            diag = np.diagonal(logits, offset)
            np.testing.assert_allclose(diag, np.full_like(diag, diag[0]), rtol=1e-5, atol=1e-5)
        assert np.ptp([logits[0, j] for j in range(n)]) > 1e-3  # but RoPE does see j − i

    @chex.variants(with_jit=True, without_jit=True)
    def test_efficient_global_pointer_matches_reference(self):
        v = variant_ops(self.variant)
        batch, n, d, types = 2, 5, 6, 3
        q, k = (self.rng.normal(size=(batch, n, d)).astype(np.float32) for _ in range(2))
        bias_start, bias_end = (self.rng.normal(size=(batch, n, types)).astype(np.float32)
                                for _ in range(2))
        valid = random_valid(self.rng, batch, n)
        got = np.asarray(v.efficient_global_pointer_logits(q, k, bias_start, bias_end, valid=valid))
        want, exists = egp_ref(q, k, bias_start, bias_end, valid)
        assert got.shape == (batch, types, n, n)
        np.testing.assert_allclose(got[exists], want[exists], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[~exists], NEG32)
        # With zero bias every type sees the same shared score.
        zero = np.zeros_like(bias_start)
        shared = np.asarray(v.efficient_global_pointer_logits(q, k, zero, zero, valid=valid))
        np.testing.assert_array_equal(shared[:, 0], shared[:, 1])

    @chex.variants(with_jit=True, without_jit=True)
    def test_decode_spans_hand_built(self):
        v = variant_ops(self.variant)
        logits = np.full((2, 2, 4, 4), -3.0, dtype=np.float32)
        logits[0, 1, 0, 2] = 1.0
        logits[0, 0, 3, 3] = 0.5
        logits[1, 0, 1, 2] = 2.0
        logits[1, 1, 0, 0] = 0.2
        logits[1, 1, 2, 3] = 0.0  # not above the threshold
        logits[1, 0, 2, 1] = 5.0  # end < start: never a span
        spans, scores, count = v.decode_spans(logits, max_spans=3)
        np.testing.assert_array_equal(spans, [[[1, 0, 2], [0, 3, 3], [-1, -1, -1]],
                                              [[0, 1, 2], [1, 0, 0], [-1, -1, -1]]])
        np.testing.assert_array_equal(scores, np.float32([[1.0, 0.5, -np.inf],
                                                          [2.0, 0.2, -np.inf]]))
        np.testing.assert_array_equal(count, [2, 2])
        spans, _, count = v.decode_spans(logits, max_spans=1, threshold=0.3)
        np.testing.assert_array_equal(spans, [[[1, 0, 2]], [[0, 1, 2]]])
        np.testing.assert_array_equal(count, [2, 1])  # example 0 has one more than fits
        # Masked spans of real GlobalPointer logits never decode.
        q = np.ones((3, 1, 2), np.float32)
        logits = v.global_pointer_logits(q, q, rope=False, valid=np.array([1, 1, 0]))
        spans, _, count = v.decode_spans(logits, max_spans=4)
        assert int(count) == 3
        assert sorted(map(tuple, np.asarray(spans[:3]).tolist())) == [(0, 0, 0), (0, 0, 1),
                                                                       (0, 1, 1)]

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(((), 4), ((3,), 7), ((2, 3), 2), ((2,), 200))
    def test_decode_spans_matches_reference(self, lead, max_spans):
        """Random scores, more candidates than rows, ties, empty examples, `valid`."""
        v = variant_ops(self.variant)
        types, n = 3, 6
        logits = self.rng.normal(size=(*lead, types, n, n)).astype(np.float32)
        # Ties: a handful of values repeated across types and positions.
        logits = np.where(self.rng.random(logits.shape) < 0.5, np.round(logits, 1), logits)
        if lead:
            logits.reshape(-1, types, n, n)[0] = -1.0  # an example with nothing above 0
        check_decoded(v.decode_spans, logits, max_spans)
        check_decoded(v.decode_spans, logits, max_spans, threshold=0.7)
        valid = random_valid(self.rng, int(np.prod(lead)), n).reshape(*lead, n)
        check_decoded(v.decode_spans, logits, max_spans, threshold=-0.5, valid=valid)
        if lead:  # vmapped over the leading axis
            mapped = jax.vmap(lambda x: v.decode_spans(x, max_spans=max_spans))
            check_decoded(lambda x, **_: mapped(x), logits, max_spans)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(((), 5), ((4,), 6), ((2, 3), 4), ((3,), 0))
    def test_span_encodings_match_reference(self, lead, max_spans):
        v = variant_ops(self.variant)
        types, n = 3, 5
        rows = random_span_rows(self.rng, lead, max_spans, types, n)
        flat = v.spans_to_flat(rows, types, n)
        dense = v.spans_to_dense(rows, types, n)
        assert flat.dtype == jnp.int32 and flat.shape == (*lead, max_spans)
        assert dense.dtype == jnp.int32 and dense.shape == (*lead, types, n, n)
        np.testing.assert_array_equal(flat, flat_ref(rows, types, n))
        np.testing.assert_array_equal(dense, dense_ref(rows, types, n))
        if lead:  # vmapped over the leading axis
            np.testing.assert_array_equal(
                jax.vmap(lambda r: v.spans_to_dense(r, types, n))(jnp.asarray(rows)), dense)

    @chex.variants(with_jit=True, without_jit=True)
    def test_span_encodings_round_trip(self):
        """rows → dense → rows (decode_spans) gives the distinct spans; flat indexes dense."""
        v = variant_ops(self.variant)
        batch, types, n = 6, 4, 7
        rows = random_span_rows(self.rng, (batch,), 8, types, n)
        rows[0] = -1  # an example without spans
        dense = np.asarray(v.spans_to_dense(rows, types, n))
        spans, _, count = v.decode_spans(dense.astype(np.float32), max_spans=8, threshold=0.5)
        back = np.asarray([(b, *row) for b in range(batch)
                           for row in np.asarray(spans[b, :count[b]]).tolist()]).reshape(-1, 4)
        want = sorted({(b, *(int(x) for x in row)) for b in range(batch) for row in rows[b]
                       if is_span_ref(row, types, n)})
        assert sorted(tuple(r) for r in back.tolist()) == want
        flat = np.asarray(v.spans_to_flat(rows, types, n))
        for b in range(batch):
            real = flat[b][flat[b] >= 0]
            assert np.all(dense[b].reshape(-1)[real] == 1)
            assert len(set(real.tolist())) == dense[b].sum()
            # Decoded rows encode back to the same flat indices.
            decoded = back[back[:, 0] == b][:, 1:]
            again = np.asarray(v.spans_to_flat(decoded.reshape(-1, 3), types, n))
            assert sorted(again.tolist()) == sorted(set(real.tolist()))

    @chex.variants(with_jit=True, without_jit=True)
    def test_span_encodings_give_the_same_zlpr_loss(self):
        """The sparse loss on flat indices equals the dense loss on dense labels."""
        v = variant_ops(self.variant)
        batch, types, n = 3, 2, 6
        rows = random_span_rows(self.rng, (batch,), 5, types, n)
        logits = self.rng.normal(scale=2.0, size=(batch, types, n, n)).astype(np.float32)
        sparse = v.sparse_zlpr_loss(logits.reshape(batch, -1), v.spans_to_flat(rows, types, n))
        dense = v.zlpr_loss(logits, v.spans_to_dense(rows, types, n), axis=(-3, -2, -1))
        np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_span_f1_counts(self, with_valid):
        v = variant_ops(self.variant)
        shape = (3, 2, 5, 5)
        logits = self.rng.normal(size=shape).astype(np.float32)
        labels = (self.rng.random(shape) < 0.3).astype(np.int32)
        valid = random_valid(self.rng, 3, 5) if with_valid else None
        got = v.span_f1(logits, labels, valid=valid, threshold=0.2)
        tp, fp, fn = counts_ref(logits, labels, valid, 0.2)
        assert (float(got["tp"]), float(got["fp"]), float(got["fn"])) == (tp, fp, fn)
        np.testing.assert_allclose(got["precision"], tp / (tp + fp), rtol=1e-6)
        np.testing.assert_allclose(got["recall"], tp / (tp + fn), rtol=1e-6)
        np.testing.assert_allclose(got["f1"], 2 * tp / (2 * tp + fp + fn), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_f1_from_counts_accumulates(self):
        v = variant_ops(self.variant)
        shape = (4, 2, 3, 3)
        logits = self.rng.normal(size=shape).astype(np.float32)
        labels = self.rng.random(shape) < 0.4
        parts = [v.span_f1(logits[:2], labels[:2]), v.span_f1(logits[2:], labels[2:])]
        summed = v.f1_from_counts(*(sum(p[key] for p in parts) for key in ("tp", "fp", "fn")))
        whole = v.span_f1(logits, labels)
        chex.assert_trees_all_close(summed, whole, rtol=1e-6)
        # Perfect prediction gives 1; empty denominators give 0, not NaN.
        perfect = v.span_f1(np.where(labels, 1.0, -1.0).astype(np.float32), labels)
        assert float(perfect["f1"]) == 1.0
        none = v.f1_from_counts(0, 0, 0)
        assert all(float(none[key]) == 0.0 for key in ("precision", "recall", "f1"))


def test_errors_name_the_argument():
    q = np.zeros((2, 4, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"`q` and `k` must have the same shape"):
        global_pointer_logits(q, q[..., :4])
    with pytest.raises(ValueError, match=r"`q` must have at least 3 axes"):
        global_pointer_logits(q[0, 0], q[0, 0])
    with pytest.raises(ValueError, match=r"`q` must have an even last axis"):
        global_pointer_logits(q[..., :3], q[..., :3])
    with pytest.raises(ValueError, match=r"`valid` with shape \(2, 5\) does not broadcast"):
        global_pointer_logits(q, q, valid=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"`valid` must have a bool or integer dtype"):
        global_pointer_logits(q, q, valid=np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"`layout` must be one of"):
        global_pointer_logits(q, q, layout="pairs")
    with pytest.raises(ValueError, match=r"`k` must be a floating-point array"):
        global_pointer_logits(q, q.astype(np.int32))
    shared = q[:, :, 0]
    with pytest.raises(ValueError, match=r"`bias_start` must have shape q.shape\[:-1\]"):
        efficient_global_pointer_logits(shared, shared, q[:, :3, 0, :2], q[:, :3, 0, :2])
    with pytest.raises(ValueError, match=r"`bias_start` and `bias_end` must have the same"):
        efficient_global_pointer_logits(shared, shared, q[:, :, 0, :2], q[:, :, 0, :3])
    with pytest.raises(ValueError, match=r"`logits` must be square"):
        decode_spans(np.zeros((2, 3, 4)), max_spans=2)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=r"`max_spans` must be a positive Python int"):
            decode_spans(np.zeros((2, 3, 3)), max_spans=bad)
    with pytest.raises(ValueError, match=r"`valid`"):
        decode_spans(np.zeros((2, 3, 3)), max_spans=2, valid=np.ones(4, bool))
    with pytest.raises(ValueError, match=r"`logits` and `labels` must have the same"):
        span_f1(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
