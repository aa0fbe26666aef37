"""Model shapes, parameter counts, masks, attention scales, factory and config errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models, ops
from kexue.parallel import nnx_state_shardings
from tests.models._configs import forward, model_config

ALL_NAMES = ("roformer", "roformer_mlm", "causal_lm", "global_pointer_ner",
             "multilabel_classifier", "vit")


def build(config, seed: int = 0):
    return models.build_model(config, rngs=nnx.Rngs(seed))


def abstract(config):
    return nnx.eval_shape(lambda: build(config))


# ------------------------------------------------------------------ parameter counts


def block_params(D, F, h, h_kv, *, gated=False, norm="layernorm", bias=True):
    """One transformer block, counted by hand."""
    d = D // h
    b = 1 if bias else 0
    attention = (D * h * d + b * h * d) + 2 * (D * h_kv * d + b * h_kv * d) + (h * d * D + b * D)
    ffn = (D * F + b * F) * (2 if gated else 1) + (F * D + b * D)
    norms = 2 * (2 * D if norm == "layernorm" else D)
    return attention + ffn + norms


def encoder_params(V, D, F, h, L, h_kv=None, **kw):
    norm = 2 * D if kw.get("norm", "layernorm") == "layernorm" else D
    return V * D + L * block_params(D, F, h, h_kv or h, **kw) + norm


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("roformer", {}, encoder_params(64, 32, 64, 4, 2)),
        # MLM head: dense D×D + bias, LayerNorm 2D, output bias V (+ V·D untied).
        ("roformer_mlm", {}, encoder_params(64, 32, 64, 4, 2) + 32 * 32 + 32 + 64 + 64),
        ("roformer_mlm", {"tie_embeddings": False},
         encoder_params(64, 32, 64, 4, 2) + 32 * 32 + 32 + 64 + 64 + 32 * 64),
        ("causal_lm", {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm",
                       "use_bias": False},
         encoder_params(64, 32, 64, 4, 2, h_kv=2, gated=True, norm="rmsnorm", bias=False)
         + 32 * 64),
        ("causal_lm", {"tie_embeddings": True, "num_kv_heads": 1},
         encoder_params(64, 32, 64, 4, 2, h_kv=1)),
        # GlobalPointer: q and k kernels D×types×d_gp with biases.
        ("global_pointer_ner", {}, encoder_params(64, 32, 64, 4, 2) + 2 * (32 * 3 * 8 + 3 * 8)),
        # Efficient: q, k D×d_gp (+bias), start/end 2d_gp×types (+bias).
        ("global_pointer_ner", {"efficient": True},
         encoder_params(64, 32, 64, 4, 2) + 2 * (32 * 8 + 8) + 2 * (16 * 3 + 3)),
        ("multilabel_classifier", {}, encoder_params(64, 32, 64, 4, 2) + 32 * 5 + 5),
        # ViT: patch projection (2·2·3)×D + bias, no token table, head D×classes + bias.
        ("vit", {}, encoder_params(0, 32, 64, 4, 2) + 12 * 32 + 32 + 32 * 5 + 5),
    ],
)
def test_parameter_counts(name, overrides, expected):
    config = model_config(name, num_layers=2, **overrides)
    assert models.count_params(abstract(config)) == expected


def test_every_parameter_has_logical_axes():
    for name in ALL_NAMES:
        state = nnx.state(abstract(model_config(name, num_kv_heads=2, activation="geglu")),
                          nnx.Param)
        for path, variable in jax.tree_util.tree_leaves_with_path(
                state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            axes = variable.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == variable.get_value().ndim, (name, path)


def test_flops_per_token_formula():
    V, D, F, h, L, n = 64, 32, 64, 4, 2, 16
    config = model_config("causal_lm", num_layers=L)
    matmul_params = encoder_params(V, D, F, h, L) + D * V - V * D  # untied table is a lookup
    assert models.flops_per_token(config, seq_len=n) == 6 * matmul_params + 12 * L * D * n
    assert models.flops_per_token(config, seq_len=n, training=False) == (
        2 * matmul_params + 4 * L * D * n)
    tied = model_config("causal_lm", tie_embeddings=True, num_layers=L)
    assert models.flops_per_token(tied, seq_len=n) == (
        6 * encoder_params(V, D, F, h, L) + 12 * L * D * n)  # tied table is the output matmul


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shapes_and_dtypes(rng, dtype):
    b, n = 2, 6
    tokens = jnp.asarray(rng.integers(0, 64, (b, n)))
    expected = {"roformer": ((b, n, 32), dtype), "roformer_mlm": ((b, n, 64), "float32"),
                "causal_lm": ((b, n, 64), "float32"),
                "global_pointer_ner": ((b, 3, n, n), "float32"),
                "multilabel_classifier": ((b, 5), "float32"), "vit": ((b, 5), "float32")}
    for name, (shape, out_dtype) in expected.items():
        model = build(model_config(name, dtype=dtype))
        inputs = (jnp.asarray(rng.normal(size=(b, 8, 8, 3)), jnp.float32) if name == "vit"
                  else tokens)
        out = forward(model, inputs)
        assert out.shape == shape and out.dtype == jnp.dtype(out_dtype), name
        assert np.isfinite(np.asarray(out, np.float32)).all(), name
        kernel = model.transformer if name in ("causal_lm", "vit") else None
        if kernel is not None:  # parameters stay float32 whatever the compute dtype
            assert kernel.blocks[0].attention.query.kernel[...].dtype == jnp.float32


def test_bfloat16_compute_is_close_to_float32(rng):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 8)))
    full = forward(build(model_config("roformer_mlm")), tokens)
    half = forward(build(model_config("roformer_mlm", dtype="bfloat16")), tokens)
    np.testing.assert_allclose(np.asarray(half), np.asarray(full), atol=5e-2)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("scale", ["standard", "entropy_invariant"])
def test_padding_changes_nothing_at_real_tokens(rng, scale):
    model = build(model_config("roformer", num_layers=2, attention_scale=scale,
                                 norm_position="post"))
    n, pad = 7, 5
    tokens = rng.integers(0, 64, (2, n))
    padded = np.concatenate([tokens, rng.integers(0, 64, (2, pad))], axis=1)
    other_pad = padded.copy()
    other_pad[:, n:] = rng.integers(0, 64, (2, pad))
    valid = np.arange(n + pad)[None, :] < n
    alone = forward(model, jnp.asarray(tokens))
    with_pad = forward(model, jnp.asarray(padded), valid=jnp.asarray(np.repeat(valid, 2, 0)))
    with_other = forward(model, jnp.asarray(other_pad), valid=jnp.asarray(np.repeat(valid, 2, 0)))
    np.testing.assert_allclose(np.asarray(with_pad[:, :n]), np.asarray(alone), atol=2e-5)
    np.testing.assert_allclose(np.asarray(with_other[:, :n]), np.asarray(alone), atol=2e-5)


def test_causal_lm_logits_ignore_future_tokens(rng):
    model = build(model_config("causal_lm", num_layers=2, attention_scale="entropy_invariant"))
    tokens = rng.integers(0, 64, (2, 9))
    changed = tokens.copy()
    changed[:, 5:] = rng.integers(0, 64, (2, 4))
    a, b = forward(model, jnp.asarray(tokens)), forward(model, jnp.asarray(changed))
    np.testing.assert_allclose(np.asarray(a[:, :5]), np.asarray(b[:, :5]), atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_encoder_attention_mask_hides_keys(rng):
    """`mask` is an attention mask: under a prefix-LM mask the prefix sees only itself."""
    model = build(model_config("roformer", num_layers=2))
    n, prefix = 8, 3
    tokens = rng.integers(0, 64, (2, n))
    changed = tokens.copy()
    changed[:, prefix:] = (tokens[:, prefix:] + rng.integers(1, 64, (2, n - prefix))) % 64
    mask = ops.prefix_lm_mask(jnp.full((2,), prefix), n)
    a, b = (np.asarray(forward(model, jnp.asarray(t), mask=mask)) for t in (tokens, changed))
    np.testing.assert_allclose(a[:, :prefix], b[:, :prefix], atol=1e-6)
    assert not np.allclose(a[:, prefix:], b[:, prefix:])
    plain_a, plain_b = (np.asarray(forward(model, jnp.asarray(t))) for t in (tokens, changed))
    assert not np.allclose(plain_a[:, :prefix], plain_b[:, :prefix])


def test_causal_lm_attention_mask_restricts_the_causal_one(rng):
    model = build(model_config("causal_lm", num_layers=2))
    n = 6
    tokens = rng.integers(0, 64, (1, n))
    changed = tokens.copy()
    changed[:, 0] = (tokens[:, 0] + 1) % 64
    itself = jnp.eye(n, dtype=bool)  # every position sees only itself
    a, b = (np.asarray(forward(model, jnp.asarray(t), mask=itself)) for t in (tokens, changed))
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-6)
    assert not np.allclose(a[:, 0], b[:, 0])
    # An all-True mask leaves the causal model as it is.
    np.testing.assert_allclose(
        np.asarray(forward(model, jnp.asarray(tokens), mask=jnp.ones((n, n), bool))),
        np.asarray(forward(model, jnp.asarray(tokens))), atol=1e-6)


def test_global_pointer_masks_impossible_spans_and_decodes(rng):
    model = build(model_config("global_pointer_ner", efficient=True))
    valid = np.arange(6)[None, :] < np.array([[6], [4]])
    logits = np.asarray(forward(model, jnp.asarray(rng.integers(0, 64, (2, 6))),
                                valid=jnp.asarray(valid)))
    lower = np.tril(np.ones((6, 6), bool), -1)
    assert (logits[:, :, lower] < -1e8).all()
    assert (logits[1, :, 4:, :] < -1e8).all() and (logits[1, :, :, 4:] < -1e8).all()
    shifted = logits + np.where(logits > -1e8, 10.0, 0.0)  # every possible span positive
    spans, _, count = models.GlobalPointerNER.decode(shifted, max_spans=3 * 21)
    decoded = [(b, *row) for b in range(2) for row in np.asarray(spans[b, :count[b]]).tolist()]
    expected = [(b, t, i, j) for b, length in ((0, 6), (1, 4)) for t in range(3)
                for i in range(length) for j in range(i, length)]
    assert sorted(decoded) == expected


def test_encoder_accepts_float_positions(rng):
    model = build(model_config("roformer", rope_layout="half", rotary_dim=4))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 5)))
    integer = forward(model, tokens, positions=jnp.arange(5))
    floats = forward(model, tokens, positions=jnp.arange(5, dtype=jnp.float32) * 1.0)
    np.testing.assert_allclose(np.asarray(floats), np.asarray(integer), atol=1e-5)
    stretched = forward(model, tokens, positions=jnp.linspace(0.0, 1.0, 5) * 13.7)
    assert not np.allclose(np.asarray(stretched), np.asarray(integer), atol=1e-3)


# --------------------------------------------------------------- attention scales


def test_entropy_invariant_equals_standard_at_512_keys(rng):
    """log_512(512) = 1: the two scales coincide when a query sees 512 keys."""
    tokens = jnp.asarray(rng.integers(0, 64, (1, 512)))
    outputs = {}
    for scale in ("standard", "entropy_invariant"):
        model = build(model_config("roformer", attention_scale=scale))
        outputs[scale] = (forward(model, tokens),
                          forward(model, tokens, valid=jnp.ones((1, 512), bool)))
    for got, want in zip(outputs["entropy_invariant"], outputs["standard"], strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    short = tokens[:, :64]
    models_by_scale = {s: build(model_config("roformer", attention_scale=s))
                       for s in ("standard", "entropy_invariant")}
    assert not np.allclose(np.asarray(forward(models_by_scale["standard"], short)),
                           np.asarray(forward(models_by_scale["entropy_invariant"], short)),
                           atol=1e-4)


# ------------------------------------------------------------------------- losses


def test_global_pointer_sparse_loss_equals_dense(rng):
    dense_model = build(model_config("global_pointer_ner"))
    sparse_model = build(model_config("global_pointer_ner", gp_loss="sparse"))
    b, n, types = 2, 7, 3
    valid = jnp.asarray(np.arange(n)[None, :] < np.array([[7], [5]]))
    logits = forward(dense_model, jnp.asarray(rng.integers(0, 64, (b, n))), valid=valid)
    spans = np.full((b, 4, 3), -1)
    spans[0, :3] = [(0, 1, 3), (2, 0, 0), (2, 4, 6)]
    spans[1, :2] = [(1, 2, 2), (0, 0, 4)]
    dense = np.zeros((b, types, n, n), np.int32)
    for i, row in enumerate(spans):
        for t, s, e in row:
            if t >= 0:
                dense[i, t, s, e] = 1
    want = dense_model.loss(logits, jnp.asarray(dense), valid=valid)
    got = sparse_model.loss(logits, jnp.asarray(spans), valid=valid)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # The dense loss reads the same span rows as the sparse one.
    from_rows = dense_model.loss(logits, jnp.asarray(spans), valid=valid)
    np.testing.assert_allclose(float(from_rows), float(want), rtol=1e-6)
    with pytest.raises(ValueError, match=r"spans \[b=2, P, 3\]"):
        sparse_model.loss(logits, jnp.asarray(dense))


def test_multilabel_loss_is_zlpr_mean(rng):
    logits = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    labels = rng.integers(0, 2, (3, 5))
    s = np.asarray(logits, np.float64)
    want = np.mean([np.log1p(np.exp(s[i][labels[i] == 0]).sum())
                    + np.log1p(np.exp(-s[i][labels[i] == 1]).sum()) for i in range(3)])
    got = models.MultiLabelClassifier.loss(logits, jnp.asarray(labels))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


# ----------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "`num_heads`: expected a divisor of `width` = 32; got 5"),
        ({"num_kv_heads": 3}, "`num_kv_heads`: expected a divisor of `num_heads` = 4"),
        ({"rope_layout": "rotate"}, "`rope_layout`: expected one of ['interleaved', 'half']"),
        ({"attention_scale": "log"}, "`attention_scale`: expected one of ['standard'"),
        ({"norm": "batchnorm"}, "`norm`: expected one of ['layernorm', 'rmsnorm']"),
        ({"norm_position": "middle"}, "`norm_position`: expected one of ['pre', 'post']"),
        ({"activation": "tanh"}, "`activation`: expected one of ['gelu'"),
        ({"dtype": "int8"}, "`dtype`: expected one of"),
        ({"rotary_dim": 3}, "`rotary_dim`: expected 0 or a multiple of 2·rope_dims = 2"),
        ({"rotary_dim": 16}, "at most the head dim width / num_heads = 8; got 16"),
        ({"width": 0}, "`width`: expected an int >= 1; got 0"),
        ({"num_head": 4}, "`num_head`: not a setting of model 'roformer_mlm'"),
        ({"dropout_rate": 1.0}, "`dropout_rate`: expected a number in [0, 1)"),
    ],
)
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(model_config("roformer_mlm", **overrides))


def test_bad_head_configs():
    with pytest.raises(ValueError, match=re.escape("`name`: expected one of ['roformer'")):
        model_config("bert")
    with pytest.raises(ValueError, match=re.escape("`loss`: expected one of")):
        build(model_config("global_pointer_ner", gp_loss="softmax"))
    with pytest.raises(ValueError, match=re.escape("`patch_size`: expected a divisor")):
        build(model_config("vit", patch_size=3))
    with pytest.raises(ValueError, match=re.escape("`rope_dims`: expected 2")):
        build(model_config("vit", rope_dims=1))
    with pytest.raises(ValueError, match=re.escape("`pooling`: expected one of")):
        build(model_config("multilabel_classifier", pooling="max"))
    with pytest.raises(ValueError, match=re.escape("`seq_len`: expected a positive int")):
        models.flops_per_token(model_config("causal_lm"))


def test_shardings_follow_the_logical_axes():
    from jax.sharding import PartitionSpec as P

    from kexue.parallel import make_mesh

    mesh = make_mesh(2, 2, 2)
    state = nnx.state(abstract(model_config("causal_lm", num_kv_heads=2)))
    shardings = nnx_state_shardings(state, mesh)
    block = shardings["transformer"]["blocks"][0]
    assert block["attention"]["query"]["kernel"].get_value().spec == P("fsdp", "tensor", None)
    assert block["attention"]["key"]["kernel"].get_value().spec == P("fsdp", "tensor", None)
    assert block["attention"]["out"]["kernel"].get_value().spec == P("tensor", None, "fsdp")
    assert block["ffn"]["wi"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert block["ffn"]["wo"]["kernel"].get_value().spec == P("tensor", "fsdp")
    assert shardings["embed"]["embedding"].get_value().spec == P("tensor", "fsdp")
    assert shardings["lm_head"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert block["ffn_norm"]["scale"].get_value().spec == P(None)


# ------------------------------------------------------- masked-LM head at chosen positions


@pytest.mark.parametrize("tie", [True, False])
def test_mlm_head_at_predict_positions_matches_the_dense_head(rng, tie):
    """Logits, masked-LM loss and its gradient equal those of the head at every position."""
    model = build(model_config("roformer_mlm", tie_embeddings=tie), seed=int(rng.integers(99)))
    b, n, p = 3, 12, 5
    tokens = jnp.asarray(rng.integers(0, 64, (b, n)))
    labels = jnp.asarray(rng.integers(0, 64, (b, n)))
    chosen = np.zeros((b, n), bool)
    where = np.zeros((b, p), np.int32)
    real = np.zeros((b, p), np.float32)
    for row, count in enumerate((5, 2, 0)):  # full, partly padded, empty rows
        picked = np.sort(rng.choice(n, count, replace=False))
        chosen[row, picked], where[row, :count], real[row, :count] = True, picked, 1.0

    dense = forward(model, tokens)
    sparse = forward(model, tokens, predict_positions=jnp.asarray(where))
    assert sparse.shape == (b, p, 64) and sparse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sparse),
                               np.take_along_axis(np.asarray(dense), where[..., None], 1),
                               rtol=1e-5, atol=1e-5)

    def dense_loss(model):
        return models.cross_entropy(model(tokens), labels, jnp.asarray(chosen, jnp.float32))

    def sparse_loss(model):
        logits = model(tokens, predict_positions=jnp.asarray(where))
        return models.cross_entropy(logits, jnp.take_along_axis(labels, jnp.asarray(where), 1),
                                    jnp.asarray(real))

    (l_dense, g_dense), (l_sparse, g_sparse) = (
        nnx.jit(nnx.value_and_grad(f))(model) for f in (dense_loss, sparse_loss))
    np.testing.assert_allclose(float(l_sparse), float(l_dense), rtol=1e-6)
    for path, a in nnx.to_flat_state(g_dense):
        s = dict(nnx.to_flat_state(g_sparse))[path]
        np.testing.assert_allclose(np.asarray(s[...]), np.asarray(a[...]), rtol=2e-4, atol=1e-6,
                                   err_msg=str(path))


def test_mlm_predict_positions_must_be_int_batch_by_count():
    model = build(model_config("roformer_mlm"))
    tokens = jnp.zeros((2, 8), jnp.int32)
    for bad in (jnp.zeros((2,), jnp.int32), jnp.zeros((3, 4), jnp.int32),
                jnp.zeros((2, 4), jnp.float32)):
        with pytest.raises(ValueError, match=r"predict_positions: expected int \[batch=2, P\]"):
            model(tokens, predict_positions=bad)
