"""Float64 NumPy references of the `kexue.ops` functions, for checks on any device.

Each function is written from the formula (the kexue.fm archive number is given), in
float64 with plain loops over pairs or explicit softmaxes, and shares no code with
`kexue`: it is the oracle the accelerator campaign (`benchmarks.accelerator`)
compares the device results against. Inputs are NumPy arrays (cast to float64 here),
outputs float64 NumPy arrays. Masks follow the kexue vocabulary: `valid` `[..., n]`
token validity, `mask` `[..., n_q, n_k]` (or `[..., h, n_q, n_k]`) attention mask,
`where` which loss entries count; True = real / may attend / counts.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "attention",
    "attention_entropy",
    "bhattacharyya_distance",
    "causal_mask",
    "cross_entropy",
    "decode_spans",
    "efficient_global_pointer",
    "entropy_invariant_scale",
    "f1_scores",
    "gaussian_kl",
    "global_pointer",
    "global_pointer_kl",
    "padding_mask",
    "prefix_lm_mask",
    "rope",
    "rope_angles",
    "rope_nd",
    "softmax_kl",
    "span_counts",
    "span_validity",
    "spans_to_dense",
    "spans_to_flat",
    "wasserstein2_distance",
    "zlpr",
    "zlpr_from_indices",
]


def _f64(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ----------------------------------------------------------------------------- RoPE


def rope(x, positions, *, base: float = 10000.0, layout: str = "interleaved",
         rotary_dim: int | None = None) -> np.ndarray:
    """`R_m x` (kexue.fm/archives/8265): pair `i` of the first `r` features turns by
    `m·base^(-2i/r)`.

    `x [..., n, h, d]`, `positions [..., n]` (broadcast to `x.shape[:-2]`). Pairs are
    `(2i, 2i+1)` for ``"interleaved"``, `(i, i + r/2)` for ``"half"``.
    """
    (x,) = _f64(x)
    d = x.shape[-1]
    r = d if rotary_dim is None else rotary_dim
    half = r // 2
    if layout == "interleaved":
        first, second = np.arange(half) * 2, np.arange(half) * 2 + 1
    elif layout == "half":
        first, second = np.arange(half), np.arange(half) + half
    else:
        raise ValueError(f"`layout` must be 'interleaved' or 'half'; got {layout!r}.")
    theta = float(base) ** (-2.0 * np.arange(half) / r)
    m = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:-2])
    angle = m[..., None, None] * theta  # [..., n, 1, half]
    a, b = x[..., first], x[..., second]
    out = x.copy()
    out[..., first] = a * np.cos(angle) - b * np.sin(angle)
    out[..., second] = a * np.sin(angle) + b * np.cos(angle)
    return out


def rope_nd(x, positions, *, base: float = 10000.0, layout: str = "interleaved",
            rotary_dim: int | None = None) -> np.ndarray:
    """N-D RoPE (kexue.fm/archives/8397): the `r` rotary features cut into `k` equal
    parts, part `j` rotated by 1-D RoPE at position `positions[..., j]` (its own
    frequencies `base^(-2i/(r/k))`); features from `r` on pass through.

    `x [..., n, h, d]`, `positions [..., n, k]`.
    """
    (x,) = _f64(x)
    positions = np.asarray(positions, np.float64)
    k = positions.shape[-1]
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    part = r // k
    out = x.copy()
    for j in range(k):
        block = x[..., j * part:(j + 1) * part]
        out[..., j * part:(j + 1) * part] = rope(block, positions[..., j], base=base,
                                                 layout=layout)
    return out


def rope_angles(positions, rotary_dim: int, *, base: float = 10000.0) -> np.ndarray:
    """`m·θ_i`, `[..., n, rotary_dim/2]`, `θ_i = base^(-2i/r)`."""
    theta = float(base) ** (-2.0 * np.arange(rotary_dim // 2) / rotary_dim)
    return np.asarray(positions, np.float64)[..., None] * theta


# ----------------------------------------------------------------------------- masks


def causal_mask(q_len: int, k_len: int | None = None) -> np.ndarray:
    """`[q, k]`: query `i` (the last `q` of `k` positions) sees key `j` iff `j ≤ i + k − q`."""
    k_len = q_len if k_len is None else k_len
    return np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + (k_len - q_len)


def padding_mask(valid) -> np.ndarray:
    """`[..., n, n]`: both tokens real."""
    valid = np.asarray(valid, bool)
    return valid[..., :, None] & valid[..., None, :]


def prefix_lm_mask(prefix_lengths, seq_len: int) -> np.ndarray:
    """`[..., n, n]`: `j < prefix` or `j ≤ i` (kexue.fm/archives/8475)."""
    prefix = np.asarray(prefix_lengths)[..., None, None]
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return (j < prefix) | (j <= i)


# ----------------------------------------------------------------------------- attention


def entropy_invariant_scale(num_keys, *, entropy_base: float = 512.0) -> np.ndarray:
    """`log(max(n, 1)) / log(b)` (kexue.fm/archives/8823)."""
    n = np.maximum(np.asarray(num_keys, np.float64), 1.0)
    return np.log(n) / math.log(entropy_base)


def attention(q, k, v, *, mask=None, scale="standard", entropy_base: float = 512.0
              ) -> np.ndarray:
    """`softmax_j(κ_i q_i·k_j | visible) v` per head, float64 (kexue.fm/archives/8823).

    `q [..., n_q, h, d]`, `k, v [..., n_k, h_kv, d]`; query head `j` reads key/value
    head `j // (h / h_kv)`. `mask` `[..., n_q, n_k]` or `[..., h, n_q, n_k]`. `κ_i` is
    `1/√d` (standard), `log_b(n_i)/√d` with `n_i` the visible keys of query `i`
    (entropy-invariant), or the number itself. A query that sees no key gives zeros.
    """
    q, k, v = _f64(q, k, v)
    h, d = q.shape[-2:]
    group = h // k.shape[-2]
    k = np.repeat(k, group, axis=-2)
    v = np.repeat(v, group, axis=-2)
    logits = np.einsum("...qhd,...khd->...hqk", q, k)  # [..., h, n_q, n_k]
    if mask is None:
        visible = np.ones(logits.shape, bool)
    else:
        mask = np.asarray(mask, bool)
        if mask.ndim < q.ndim:  # [..., n_q, n_k]: shared by the heads
            mask = mask[..., None, :, :]
        visible = np.broadcast_to(mask, logits.shape)
    counts = visible.sum(-1)  # [..., h, n_q]
    if scale == "standard":
        kappa = np.full(counts.shape, 1 / math.sqrt(d))
    elif scale == "entropy_invariant":
        kappa = entropy_invariant_scale(counts, entropy_base=entropy_base) / math.sqrt(d)
    else:
        kappa = np.full(counts.shape, float(scale))
    logits = np.where(visible, logits * kappa[..., None], -np.inf)
    peak = np.max(logits, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.where(visible, np.exp(logits - peak), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("...hqk,...khd->...qhd", probs, v)


def attention_entropy(q, k, *, mask=None, scale="standard", entropy_base: float = 512.0
                      ) -> np.ndarray:
    """`H_i = −Σ_j p_ij log p_ij` of `p_i = softmax_j(κ_i q_i·k_j | visible)`, `[..., n_q, h]`
    float64 (kexue.fm/archives/8823); 0 for a query that sees no key. Arguments as for
    `attention`."""
    q, k = _f64(q, k)
    h, d = q.shape[-2:]
    k = np.repeat(k, h // k.shape[-2], axis=-2)
    logits = np.einsum("...qhd,...khd->...hqk", q, k)
    if mask is None:
        visible = np.ones(logits.shape, bool)
    else:
        mask = np.asarray(mask, bool)
        if mask.ndim < q.ndim:
            mask = mask[..., None, :, :]
        visible = np.broadcast_to(mask, logits.shape)
    out = np.zeros(logits.shape[:-1])  # [..., h, n_q]
    for index in np.ndindex(*out.shape):
        seen = visible[index]
        if not seen.any():
            continue
        if scale == "standard":
            kappa = 1 / math.sqrt(d)
        elif scale == "entropy_invariant":
            kappa = math.log(seen.sum()) / math.log(entropy_base) / math.sqrt(d)
        else:
            kappa = float(scale)
        z = kappa * logits[index][seen]
        p = np.exp(z - z.max())
        p /= p.sum()
        out[index] = -np.sum(p * np.log(np.where(p > 0, p, 1.0)))
    return np.swapaxes(out, -1, -2)


# ----------------------------------------------------------------------------- GlobalPointer


def span_validity(n: int, valid=None) -> np.ndarray:
    """`[..., n, n]`: span `(i, j)` exists (`i ≤ j`) and both ends are real tokens."""
    upper = np.triu(np.ones((n, n), bool))
    if valid is None:
        return upper
    return upper & padding_mask(valid)


def global_pointer(q, k, *, rope_positions: bool = True, base: float = 10000.0,
                   layout: str = "interleaved") -> np.ndarray:
    """`s_α(i, j) = (R_i q_{i,α})ᵀ (R_j k_{j,α}) / √d`, `[..., types, n, n]`
    (kexue.fm/archives/8373), every span (validity is `span_validity`).

    `q, k [..., n, types, d]`.
    """
    q, k = _f64(q, k)
    n, d = q.shape[-3], q.shape[-1]
    if rope_positions:
        q = rope(q, np.arange(n), base=base, layout=layout)
        k = rope(k, np.arange(n), base=base, layout=layout)
    return np.einsum("...itd,...jtd->...tij", q, k) / math.sqrt(d)


def efficient_global_pointer(q, k, bias_start, bias_end, *, rope_positions: bool = True,
                             base: float = 10000.0, layout: str = "interleaved") -> np.ndarray:
    """`(R_i q_i)ᵀ (R_j k_j) / √d + (bias_start[i, α] + bias_end[j, α]) / 2`,
    `[..., types, n, n]` (kexue.fm/archives/8877).

    `q, k [..., n, d]`, `bias_start, bias_end [..., n, types]`.
    """
    q, k, bias_start, bias_end = _f64(q, k, bias_start, bias_end)
    shared = global_pointer(q[..., None, :], k[..., None, :], rope_positions=rope_positions,
                            base=base, layout=layout)  # [..., 1, n, n]
    start = np.swapaxes(bias_start, -1, -2)[..., :, None]  # [..., types, n, 1]
    end = np.swapaxes(bias_end, -1, -2)[..., None, :]  # [..., types, 1, n]
    return shared + (start + end) / 2


def decode_spans(logits, *, threshold: float = 0.0) -> np.ndarray:
    """Rows `(batch, type, start, end)` of every logit above `threshold`, sorted;
    leading axes flattened into the batch index."""
    logits = np.asarray(logits, np.float64)
    flat = logits.reshape((-1, *logits.shape[-3:]))
    rows = [(b, t, i, j) for b in range(flat.shape[0]) for t in range(flat.shape[1])
            for i in range(flat.shape[2]) for j in range(flat.shape[3])
            if flat[b, t, i, j] > threshold]
    return np.asarray(rows, np.int64).reshape(-1, 4)


def _is_span(row, num_types: int, n: int) -> bool:
    kind, start, end = (int(x) for x in row)
    return 0 <= kind < num_types and 0 <= start <= end < n


def spans_to_flat(spans, num_types: int, seq_len: int) -> np.ndarray:
    """Span rows `(type, start, end)` `[..., P, 3]` → `type·n² + start·n + end`, −1 for
    a row that is no span (type outside `[0, types)`, or not `0 ≤ start ≤ end < n`)."""
    spans = np.asarray(spans)
    out = np.full(spans.shape[:-1], -1, np.int64)
    for position in np.ndindex(*spans.shape[:-1]):
        row = spans[position]
        if _is_span(row, num_types, seq_len):
            out[position] = (row[0] * seq_len + row[1]) * seq_len + row[2]
    return out


def spans_to_dense(spans, num_types: int, seq_len: int) -> np.ndarray:
    """Span rows `[..., P, 3]` → 0/1 labels `[..., types, n, n]` (kexue.fm/archives/8373);
    rows that are no spans are left out, a repeated row counts once."""
    spans = np.asarray(spans)
    out = np.zeros((*spans.shape[:-2], num_types, seq_len, seq_len), np.int64)
    for position in np.ndindex(*spans.shape[:-2]):
        for row in spans[position]:
            if _is_span(row, num_types, seq_len):
                out[(*position, *(int(x) for x in row))] = 1
    return out


def span_counts(pred_logits, labels, *, valid=None, threshold: float = 0.0
                ) -> tuple[int, int, int]:
    """`(tp, fp, fn)` of predicted (`logit > threshold`) against gold (`label > 0`)
    spans; with `valid`, only spans `i ≤ j` between real tokens count."""
    pred = np.asarray(pred_logits, np.float64) > threshold
    gold = np.asarray(labels) > 0
    if valid is not None:
        keep = span_validity(pred.shape[-1], valid)[..., None, :, :]
        pred, gold = pred & keep, gold & keep
    return int(np.sum(pred & gold)), int(np.sum(pred & ~gold)), int(np.sum(~pred & gold))


def f1_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision `tp/(tp+fp)`, recall `tp/(tp+fn)`, F1 `2tp/(2tp+fp+fn)`; 0 for 0/0."""
    def ratio(a, b):
        return a / b if b > 0 else 0.0
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn)}


# ----------------------------------------------------------------------------- losses


def _log1p_weighted_sum_exp(a: np.ndarray, weights: np.ndarray, axes: tuple[int, ...]
                            ) -> np.ndarray:
    """`log(1 + Σ w e^a)` over `axes` (entries with `w = 0` left out), shifted for safety."""
    a = np.where(weights > 0, a, -np.inf)
    peak = np.maximum(np.max(a, axis=axes, keepdims=True), 0.0)
    total = np.exp(-peak) + np.sum(weights * np.exp(a - peak), axis=axes, keepdims=True)
    return np.squeeze(np.log(total) + peak, axis=axes)


def _axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def zlpr(logits, labels, *, where=None, axis=-1) -> np.ndarray:
    """ZLPR (kexue.fm/archives/7359, 9064):
    `log(1 + Σ (1 − t) e^{s}) + log(1 + Σ t e^{−s})` over `axis`, entries with
    `where = False` left out; `labels` `t` in `[0, 1]`."""
    s, t = _f64(logits, labels)
    keep = np.ones(s.shape, bool) if where is None else np.broadcast_to(
        np.asarray(where, bool), s.shape)
    axes = _axes(axis, s.ndim)
    negative = _log1p_weighted_sum_exp(s, np.where(keep, 1 - t, 0.0), axes)
    positive = _log1p_weighted_sum_exp(-s, np.where(keep, t, 0.0), axes)
    return negative + positive


def zlpr_from_indices(logits, positive_indices, *, where=None) -> np.ndarray:
    """ZLPR over the last axis with the positives listed as class indices (−1 = none)."""
    (s,) = _f64(logits)
    idx = np.broadcast_to(np.asarray(positive_indices), s.shape[:-1] + np.shape(
        positive_indices)[-1:])
    labels = np.zeros(s.shape)
    for position in np.ndindex(*s.shape[:-1]):
        for c in idx[position]:
            if 0 <= c < s.shape[-1]:
                labels[(*position, c)] = 1.0
    return zlpr(s, labels, where=where, axis=-1)


def global_pointer_kl(s, t, *, where=None, axis=-1) -> np.ndarray:
    """`Σ (σ(s) − σ(t))(s − t)`, the symmetric Bernoulli KL (kexue.fm/archives/9039)."""
    s, t = _f64(s, t)
    keep = np.ones(s.shape, bool) if where is None else np.broadcast_to(
        np.asarray(where, bool), s.shape)

    def sigmoid(x):
        return 0.5 * (1 + np.tanh(x / 2))

    terms = np.where(keep, (sigmoid(s) - sigmoid(t)) * (s - t), 0.0)
    return np.sum(terms, axis=_axes(axis, s.ndim))


def softmax_kl(s, t, *, where=None, axis=-1) -> np.ndarray:
    """`KL(p‖q) + KL(q‖p) = Σ (p − q)(s − t)` with `p, q` the softmaxes over the kept
    entries of `axis` (kexue.fm/archives/9039)."""
    s, t = _f64(s, t)
    keep = np.ones(s.shape, bool) if where is None else np.broadcast_to(
        np.asarray(where, bool), s.shape)
    axes = _axes(axis, s.ndim)

    def softmax(x):
        x = np.where(keep, x, -np.inf)
        peak = np.max(x, axis=axes, keepdims=True)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        e = np.where(keep, np.exp(x - peak), 0.0)
        total = e.sum(axis=axes, keepdims=True)
        return np.divide(e, total, out=np.zeros_like(e), where=total > 0)

    terms = np.where(keep, (softmax(s) - softmax(t)) * (s - t), 0.0)
    return np.sum(terms, axis=axes)


def cross_entropy(logits, labels, weights=None) -> float:
    """`Σ w (logsumexp(s) − s[label]) / max(Σ w, 1)` (mean without weights)."""
    (s,) = _f64(logits)
    labels = np.asarray(labels)
    peak = s.max(-1, keepdims=True)
    logsumexp = np.log(np.exp(s - peak).sum(-1)) + peak[..., 0]
    nll = logsumexp - np.take_along_axis(s, labels[..., None], -1)[..., 0]
    if weights is None:
        return float(nll.mean())
    (w,) = _f64(weights)
    return float((nll * w).sum() / max(w.sum(), 1.0))


# ----------------------------------------------------------------------------- distances


def _inv_logdet(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sign, logdet = np.linalg.slogdet(cov)
    if np.any(sign <= 0):
        raise ValueError("covariances must be positive definite")
    return np.linalg.inv(cov), logdet


def gaussian_kl(mu1, cov1, mu2, cov2) -> np.ndarray:
    """`KL(N₁‖N₂) = ½[tr(Σ₂⁻¹Σ₁) + Δᵀ Σ₂⁻¹ Δ − k + log det Σ₂ − log det Σ₁]`,
    `Δ = μ₂ − μ₁` (kexue.fm/archives/8512)."""
    mu1, cov1, mu2, cov2 = _f64(mu1, cov1, mu2, cov2)
    inv2, logdet2 = _inv_logdet(cov2)
    _, logdet1 = _inv_logdet(cov1)
    delta = mu2 - mu1
    trace = np.trace(inv2 @ cov1, axis1=-2, axis2=-1)
    maha = np.einsum("...i,...ij,...j->...", delta, inv2, delta)
    return 0.5 * (trace + maha - mu1.shape[-1] + logdet2 - logdet1)


def bhattacharyya_distance(mu1, cov1, mu2, cov2) -> np.ndarray:
    """`⅛ Δᵀ Σ⁻¹ Δ + ½ log(det Σ / √(det Σ₁ det Σ₂))`, `Σ = (Σ₁ + Σ₂)/2`
    (kexue.fm/archives/8512)."""
    mu1, cov1, mu2, cov2 = _f64(mu1, cov1, mu2, cov2)
    inv_mid, logdet_mid = _inv_logdet((cov1 + cov2) / 2)
    _, logdet1 = _inv_logdet(cov1)
    _, logdet2 = _inv_logdet(cov2)
    delta = mu2 - mu1
    maha = np.einsum("...i,...ij,...j->...", delta, inv_mid, delta)
    return maha / 8 + 0.5 * (logdet_mid - 0.5 * (logdet1 + logdet2))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of symmetric positive semi-definite matrices."""
    values, vectors = np.linalg.eigh((a + np.swapaxes(a, -1, -2)) / 2)
    root = np.sqrt(np.clip(values, 0, None))
    return (vectors * root[..., None, :]) @ np.swapaxes(vectors, -1, -2)


def wasserstein2_distance(mu1, cov1, mu2, cov2, *, squared: bool = False) -> np.ndarray:
    """`W2² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½})` (kexue.fm/archives/8512)."""
    mu1, cov1, mu2, cov2 = _f64(mu1, cov1, mu2, cov2)
    root1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(root1 @ cov2 @ root1)
    w2_sq = (np.sum((mu1 - mu2) ** 2, axis=-1)
             + np.trace(cov1 + cov2 - 2 * cross, axis1=-2, axis2=-1))
    w2_sq = np.maximum(w2_sq, 0.0)
    return w2_sq if squared else np.sqrt(w2_sq)
