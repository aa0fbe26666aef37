"""NER variants: the GlobalPointer heads against float64 oracles (with and without RoPE,
Efficient GlobalPointer), the BIO tagging baseline, R-Drop's loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models
from tests.models._configs import forward, model_config
from tests.models.test_models import encoder_params


def build(config, seed: int = 0):
    return models.build_model(config, rngs=nnx.Rngs(seed))


def bio_config(**overrides):
    return model_config("bio_tagger", num_types=3, **overrides)


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        # RoPE has no parameters: the no-RoPE heads count exactly as the RoPE ones.
        ("global_pointer_ner", {"gp_rope": False},
         encoder_params(64, 32, 64, 4, 2) + 2 * (32 * 3 * 8 + 3 * 8)),
        ("global_pointer_ner", {"gp_rope": False, "efficient": True},
         encoder_params(64, 32, 64, 4, 2) + 2 * (32 * 8 + 8) + 2 * (16 * 3 + 3)),
        # BIO: one D × (2·types + 1) kernel and its bias.
        ("bio_tagger", {"num_types": 3}, encoder_params(64, 32, 64, 4, 2) + 32 * 7 + 7),
    ],
)
def test_parameter_counts(name, overrides, expected):
    config = model_config(name, num_layers=2, **overrides)
    model = nnx.eval_shape(lambda: build(config))
    assert models.count_params(model) == expected


def test_bio_tagger_parameters_have_logical_axes():
    model = nnx.eval_shape(lambda: build(bio_config()))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for variable in leaves:
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(variable.shape), variable
    assert model.head.kernel.get_metadata()["out_sharding"] == ("embed", "classes")


def test_bio_tagger_logits_shape_and_dtype(rng):
    model = build(bio_config())
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    logits = forward(model, tokens, valid=jnp.ones((2, 9), bool))
    assert logits.shape == (2, 9, 7) and logits.dtype == jnp.float32


# ------------------------------------------------------------------ GlobalPointer without RoPE


@pytest.mark.parametrize("efficient", [False, True])
def test_gp_without_rope_scores_constant_hidden_states_the_same_everywhere(efficient):
    # One token repeated: every attention output averages identical values, so every
    # position has the same hidden state. Without RoPE the span head then scores every
    # span i ≤ j the same; with RoPE the score moves with j − i.
    n = 12
    tokens = jnp.full((1, n), 5, jnp.int32)
    upper = np.triu(np.ones((n, n), bool))
    spread = {}
    for rope in (False, True):
        model = build(model_config("global_pointer_ner", gp_rope=rope, efficient=efficient))
        logits = np.asarray(forward(model, tokens))[0]       # [types, n, n]
        values = logits[:, upper]                             # [types, n(n+1)/2]
        spread[rope] = np.max(values.max(-1) - values.min(-1))
    assert spread[False] < 1e-5, spread
    assert spread[True] > 1e-3, spread


def test_gp_without_rope_equals_plain_inner_products_of_the_projections(rng):
    model = build(model_config("global_pointer_ner", gp_rope=False))
    b, n = 2, 7
    tokens = jnp.asarray(rng.integers(0, 64, (b, n)), jnp.int32)
    valid = jnp.asarray(np.arange(n)[None, :] < np.array([[n], [5]]))
    logits = np.asarray(forward(model, tokens, valid=valid), np.float64)
    h = np.asarray(forward(model.encoder, tokens, valid=valid), np.float64)
    wq, bq = (np.asarray(model.query.kernel[...], np.float64),
              np.asarray(model.query.bias[...], np.float64))
    wk, bk = (np.asarray(model.key.kernel[...], np.float64),
              np.asarray(model.key.bias[...], np.float64))
    q = np.einsum("bnD,Dtd->bntd", h, wq) + bq
    k = np.einsum("bnD,Dtd->bntd", h, wk) + bk
    expected = np.einsum("bitd,bjtd->btij", q, k) / np.sqrt(q.shape[-1])
    exists = np.broadcast_to(
        np.triu(np.ones((n, n), bool))[None, None]
        & np.asarray(valid)[:, None, :, None] & np.asarray(valid)[:, None, None, :], logits.shape)
    np.testing.assert_allclose(logits[exists], expected[exists], rtol=1e-4, atol=1e-5)
    assert np.all(logits[~exists] < -1e3)


# ------------------------------------------------------------------ head initialisation


@pytest.mark.parametrize("efficient", [False, True])
def test_gp_head_kernels_start_at_lecun_normal_and_the_encoder_at_init_std(efficient):
    """bert4keras's GlobalPointer / EfficientGlobalPointer kernels are `lecun_normal`:
    a normal truncated at ±2σ and rescaled to std `1/√fan_in` (fan_in = D for query and
    key, 2·d_gp for the biases). The encoder keeps N(0, init_std²)."""
    names = ("query", "key", "bias_start", "bias_end") if efficient else ("query", "key")
    heads = {name: [] for name in names}
    encoder = []
    for seed in range(4):  # 4 draws: ≥ 2560 entries per kernel, std known to ~1.4%
        model = build(model_config("global_pointer_ner", width=64, num_types=10,
                                   gp_head_dim=32, efficient=efficient), seed)
        for name in names:
            heads[name].append(np.asarray(getattr(model, name).kernel[...], np.float64))
        attention = model.encoder.transformer.blocks[0].attention
        encoder.append(np.asarray(attention.query.kernel[...], np.float64))
    for name, kernels in heads.items():
        fan_in = kernels[0].shape[0]
        assert fan_in == (2 * 32 if name.startswith("bias") else 64), name
        w = np.concatenate([k.ravel() for k in kernels])
        assert abs(w.std() * np.sqrt(fan_in) - 1) < 0.06, (name, w.std(), 1 / np.sqrt(fan_in))
        assert abs(w.mean()) * np.sqrt(fan_in) < 0.1, name
        # Truncated at 2σ of the underlying normal: σ = 1/(0.8796 √fan_in).
        assert np.abs(w).max() * np.sqrt(fan_in) <= 2 / 0.87962566 + 1e-5, name
    w = np.concatenate([k.ravel() for k in encoder])
    assert abs(w.std() / 0.02 - 1) < 0.05, w.std()


def test_gp_head_init_std_draws_the_head_like_the_encoder():
    model = build(model_config("global_pointer_ner", width=64, num_types=10, gp_head_dim=32,
                               efficient=True, gp_head_init_std=0.05))
    for name in ("query", "key", "bias_start", "bias_end"):
        w = np.asarray(getattr(model, name).kernel[...], np.float64)
        assert abs(w.std() / 0.05 - 1) < 0.15, (name, w.std())
    with pytest.raises(ValueError, match="head_init_std"):
        build(model_config("global_pointer_ner", gp_head_init_std=-1.0))


# ------------------------------------------------------------------ heads with RoPE


def rope64(x: np.ndarray, layout: str, base: float) -> np.ndarray:
    """Rotate `x [n, d]` at positions 0 … n−1, pair by pair, in float64: pair `i` is
    `(x[2i], x[2i+1])` (interleaved) or `(x[i], x[i + d/2])` (half), angle `m·base^(−2i/d)`."""
    n, d = x.shape
    out = np.array(x, np.float64)
    for m in range(n):
        for i in range(d // 2):
            a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + d // 2)
            c, s = np.cos(m * base ** (-2.0 * i / d)), np.sin(m * base ** (-2.0 * i / d))
            out[m, a], out[m, b] = x[m, a] * c - x[m, b] * s, x[m, a] * s + x[m, b] * c
    return out


def head_inputs(model, rng, b=2, n=7):
    """Tokens, validity, the model's logits and its encoder's hidden states (float64)."""
    tokens = jnp.asarray(rng.integers(0, 64, (b, n)), jnp.int32)
    valid = jnp.asarray(np.arange(n)[None, :] < np.array([[n], [n - 2]]))
    logits = np.asarray(forward(model, tokens, valid=valid), np.float64)
    h = np.asarray(forward(model.encoder, tokens, valid=valid), np.float64)
    exists = (np.triu(np.ones((n, n), bool))[None, None]
              & np.asarray(valid)[:, None, :, None] & np.asarray(valid)[:, None, None, :])
    return logits, h, np.broadcast_to(exists, logits.shape)


def dense64(layer, x):
    """`x W + b` of a kexue `Dense` in float64 (contracting `x`'s last axis)."""
    kernel = np.asarray(layer.kernel[...], np.float64)
    return np.tensordot(x, kernel, axes=([-1], [0])) + np.asarray(layer.bias[...], np.float64)


ROPE_SETTINGS = [("interleaved", 10000.0), ("half", 500.0)]


@pytest.mark.parametrize(("layout", "base"), ROPE_SETTINGS)
def test_gp_head_with_rope_matches_a_float64_oracle(rng, layout, base):
    """`s_α(i, j) = (R_i q_{i,α})ᵀ (R_j k_{j,α}) / √d` with the encoder's RoPE settings."""
    model = build(model_config("global_pointer_ner", rope_layout=layout, rope_base=base))
    logits, h, exists = head_inputs(model, rng)
    q, k = dense64(model.query, h), dense64(model.key, h)          # [b, n, types, d]
    batch, _, types, d = q.shape
    expected = np.zeros(logits.shape)
    for e in range(batch):
        for t in range(types):
            qr, kr = rope64(q[e, :, t], layout, base), rope64(k[e, :, t], layout, base)
            expected[e, t] = qr @ kr.T / np.sqrt(d)
    np.testing.assert_allclose(logits[exists], expected[exists], rtol=1e-4, atol=1e-5)
    assert np.all(logits[~exists] < -1e3)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize(("layout", "base"), ROPE_SETTINGS)
def test_efficient_gp_head_matches_a_float64_oracle(rng, rope, layout, base):
    """Archive 8877 through the model: one shared `(q, k)`; per-type biases from the
    unrotated `[q; k]`, halved: `s_α(i, j) = (R_i q_i)ᵀ (R_j k_j) / √d
    + (w_s,αᵀ [q_i; k_i] + w_e,αᵀ [q_j; k_j]) / 2`."""
    model = build(model_config("global_pointer_ner", efficient=True, gp_rope=rope,
                               rope_layout=layout, rope_base=base))
    logits, h, exists = head_inputs(model, rng)
    q, k = dense64(model.query, h), dense64(model.key, h)          # [b, n, d]
    qk = np.concatenate([q, k], axis=-1)                           # before RoPE
    start, end = dense64(model.bias_start, qk), dense64(model.bias_end, qk)  # [b, n, types]
    batch, _, d = q.shape
    expected = np.zeros(logits.shape)
    for e in range(batch):
        qr = rope64(q[e], layout, base) if rope else q[e]
        kr = rope64(k[e], layout, base) if rope else k[e]
        expected[e] = (qr @ kr.T / np.sqrt(d))[None] + (
            start[e].T[:, :, None] + end[e].T[:, None, :]) / 2
    np.testing.assert_allclose(logits[exists], expected[exists], rtol=1e-4, atol=1e-5)
    assert np.all(logits[~exists] < -1e3)


# ------------------------------------------------------------------ BIO tags and decoding

# types = 2: O = 0, B-0 = 1, I-0 = 2, B-1 = 3, I-1 = 4.
HAND_TAGS = [1, 2, 2, 0, 3, 4, 2, 4, 1, 1, 2, 4]
# B-0 I-0 I-0 → (0, 0, 2); B-1 I-1 then I-0 (other type) → (1, 4, 5); the stray I-0 and
# I-1 at 6, 7 start nothing; B-0 B-0 → (0, 8, 8) then (0, 9, 10); I-1 at 11 nothing.
HAND_SPANS = [(0, 0, 2), (1, 4, 5), (0, 8, 8), (0, 9, 10)]


def loop_decode(tags, num_types, length):
    """A plain left-to-right reading of BIO tags (the reference)."""
    spans, current = [], None   # current = [type, start, end]
    for position in range(length):
        tag = int(tags[position])
        kind, inside = (tag - 1) // 2, tag > 0 and tag % 2 == 0
        if current is not None and inside and kind == current[0]:
            current[2] = position
            continue
        if current is not None:
            spans.append(tuple(current))
            current = None
        if tag > 0 and not inside and kind < num_types:
            current = [kind, position, position]
    if current is not None:
        spans.append(tuple(current))
    return sorted(spans)


def decoded_rows(spans, count):
    """`[(example, type, start, end)]` of `decode`'s padded rows."""
    return [(b, *row) for b in range(spans.shape[0])
            for row in np.asarray(spans[b, :count[b]]).tolist()]


def decoded(scores):
    spans, _, count = models.GlobalPointerNER.decode(scores, max_spans=64)
    return sorted((t, i, j) for _, t, i, j in decoded_rows(spans, count))


def test_bio_decoding_matches_the_hand_written_example():
    tags = jnp.asarray([HAND_TAGS], jnp.int32)
    assert decoded(models.bio_span_scores(tags, 2)) == sorted(HAND_SPANS)
    assert loop_decode(HAND_TAGS, 2, len(HAND_TAGS)) == sorted(HAND_SPANS)


def test_bio_decoding_treats_padding_as_outside():
    tags = jnp.asarray([HAND_TAGS], jnp.int32)
    valid = jnp.asarray([np.arange(len(HAND_TAGS)) < 10])  # cuts the span (0, 9, 10) to (0, 9, 9)
    assert decoded(models.bio_span_scores(tags, 2, valid=valid)) == sorted(
        [(0, 0, 2), (1, 4, 5), (0, 8, 8), (0, 9, 9)])


def test_bio_decoding_matches_a_loop_reference_on_random_tags(rng):
    types, b, n = 3, 16, 15
    tags = rng.integers(0, models.bio_num_tags(types), (b, n))
    lengths = rng.integers(1, n + 1, b)
    valid = np.arange(n)[None, :] < lengths[:, None]
    scores = jax.jit(models.bio_span_scores, static_argnums=1)(jnp.asarray(tags), types,
                                                                valid=jnp.asarray(valid))
    spans, _, count = models.GlobalPointerNER.decode(scores, max_spans=n)  # ≤ n BIO spans
    rows = decoded_rows(spans, count)
    for example in range(b):
        got = sorted((int(t), int(i), int(j)) for e, t, i, j in rows if e == example)
        assert got == loop_decode(tags[example], types, int(lengths[example])), example


def test_bio_tagger_decode_reads_the_argmax_tags():
    model = build(bio_config())
    tags = np.array([[1, 2, 0, 5, 6, 6, 0], [3, 3, 4, 0, 0, 0, 0]])
    logits = jnp.asarray(np.eye(7)[tags] * 5.0, jnp.float32)
    valid = jnp.asarray([[True] * 7, [True] * 3 + [False] * 4])
    spans, scores, count = jax.jit(lambda x, v: model.decode(x, max_spans=4, valid=v))(
        logits, valid)
    assert sorted(decoded_rows(spans, count)) == [(0, 0, 0, 1), (0, 2, 3, 5), (1, 1, 0, 0),
                                                  (1, 1, 1, 2)]
    np.testing.assert_array_equal(count, [2, 2])
    np.testing.assert_array_equal(scores[:, :2], 1.0)


def spans_array(rows, width=4):
    out = np.full((1, width, 3), -1, np.int32)
    out[0, :len(rows)] = np.asarray(rows, np.int32).reshape(-1, 3)  # rows may be empty
    return jnp.asarray(out)


def test_bio_tags_from_spans_by_hand():
    # (type, start, end): (1, 0, 1) and (0, 3, 5) are disjoint; (2, 4, 4) nests in the
    # second, which starts earlier, so it is the one BIO cannot hold.
    tags, kept = models.bio_tags_from_spans(spans_array([(1, 0, 1), (0, 3, 5), (2, 4, 4)]), 7)
    # O = 0, B-0 = 1, I-0 = 2, B-1 = 3, I-1 = 4, B-2 = 5, I-2 = 6.
    assert np.asarray(tags).tolist() == [[3, 4, 0, 1, 2, 2, 0]]
    assert np.asarray(kept).tolist() == [[True, True, False, False]]


def test_bio_tags_from_spans_priority_rules():
    # Same start: the longer wins; same extent: the smaller type wins.
    tags, kept = models.bio_tags_from_spans(spans_array([(0, 2, 2), (1, 2, 4), (2, 2, 4)]), 6)
    assert np.asarray(kept).tolist() == [[False, True, False, False]]
    assert np.asarray(tags).tolist() == [[0, 0, 3, 4, 4, 0]]


def test_bio_round_trip_of_disjoint_spans(rng):
    types, n = 4, 20
    for _ in range(20):
        cuts = np.sort(rng.choice(np.arange(1, n), size=6, replace=False))
        pieces = np.split(np.arange(n), cuts)
        rows = [(int(rng.integers(types)), int(p[0]), int(p[-1]))
                for p in pieces if rng.random() < 0.6]
        spans = spans_array(rows, width=8)
        tags, kept = models.bio_tags_from_spans(spans, n)
        assert np.asarray(kept)[0, :len(rows)].all() and not np.asarray(kept)[0, len(rows):].any()
        assert decoded(models.bio_span_scores(tags, types)) == sorted(rows)


def test_bio_loss_is_cross_entropy_over_real_tokens(rng):
    logits = rng.normal(size=(2, 5, 7))
    tags = rng.integers(0, 7, (2, 5))
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, tags[..., None], -1)[..., 0]
    expected = nll[valid].mean()
    got = models.BIOTagger.loss(jnp.asarray(logits, jnp.float32), jnp.asarray(tags),
                                valid=jnp.asarray(valid))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


# ------------------------------------------------------------------ dropout, errors


def test_two_calls_in_training_mode_draw_different_dropout_masks(rng):
    model = build(model_config("global_pointer_ner", dropout_rate=0.3))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)

    @nnx.jit
    def twice(model, tokens):
        return model(tokens), model(tokens)

    first, second = twice(model, tokens)
    assert not np.allclose(first, second)
    again, _ = twice(model, tokens)            # the stream moved on: new masks again
    assert not np.allclose(first, again)
    model.eval()
    first, second = twice(model, tokens)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("global_pointer_ner", {"gp_rope": "yes"}, "`rope`"),
        ("global_pointer_ner", {"gp_rope": 1}, "`rope`"),
        ("bio_tagger", {"num_types": 0}, "`num_types`"),
        ("bio_tagger", {"num_types": 3, "gp_rope": False}, "`gp_rope`"),
    ],
)
def test_bad_values_raise_naming_the_argument(name, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(model_config(name, **overrides))
