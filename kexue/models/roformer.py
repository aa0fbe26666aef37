"""RoFormer encoder (kexue.fm/archives/8265) and the heads built on it.

* `RoFormerEncoder`: token embedding + transformer stack with RoPE attention.
* `RoFormerMLM`: masked-language-model head (dense → act → norm → vocabulary logits,
  output embedding optionally tied to the input one).
* `GlobalPointerNER`: span scores per entity type, GlobalPointer (archive 8373) or
  Efficient GlobalPointer (archive 8877), ZLPR loss dense or sparse (archive 7359).
* `BIOTagger`: the token-level baseline of GlobalPointer, one softmax over the
  `2·types + 1` BIO tags per token (`bio_tags_from_spans`, `bio_span_scores`).
* `MultiLabelClassifier`: pooled encoder output → one ZLPR score per class.

Every model returns float32 logits whatever its compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kexue import ops
from kexue.models.config import (
    TransformerConfig,
    argument_error,
    check_choice,
    check_positive_int,
)
from kexue.models.layers import (
    ACTIVATION_FUNCTIONS,
    Dense,
    Embed,
    Norm,
    Transformer,
    cross_entropy,
    make_param,
)
from kexue.ops._checks import check_number

GP_LOSSES = ("dense", "sparse")
POOLINGS = ("cls", "mean")


def attention_mask_from(valid=None, mask=None):
    """Token validity `valid [b, n]` and an optional bool attention `mask` as one
    `ops.AttentionMask` (None when both are None)."""
    if valid is None and mask is None:
        return None
    return ops.AttentionMask(valid=valid, mask=mask)


class RoFormerEncoder(nnx.Module):
    """Token embedding and a transformer stack with rotary position embedding.

    With RoPE alone positions enter only inside attention, so any positions can be
    given, including floats (equal-mean random positions, kexue.fm/archives/9444).
    BERT-style inputs are options of the config: `max_positions > 0` adds a learned
    absolute position table `[P, D]` (axes `(positions, embed)`; with `rotary_dim=0`
    for BERT itself) and `type_vocab_size > 0` a token-type table `[T, D]` (axes
    `(token_types, embed)`), both summed with the token embedding before the stack:
    `x_i = E[t_i] + P[p_i] + T[s_i]` (Devlin et al., 2019).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_positive_int("vocab_size", config.vocab_size)
        c = config
        self.config = config
        table = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, init_std=c.init_std,
                     rngs=rngs)
        self.embed = Embed(c.vocab_size, c.width, **table)
        self.position_embed = (Embed(c.max_positions, c.width, axes=("positions", "embed"),
                                     **table) if c.max_positions else None)
        self.type_embed = (Embed(c.type_vocab_size, c.width, axes=("token_types", "embed"),
                                 **table) if c.type_vocab_size else None)
        self.transformer = Transformer(config, rngs=rngs)

    def embed_inputs(self, tokens: jax.Array, *, positions=None, token_types=None) -> jax.Array:
        """`E[t] (+ P[p]) (+ T[s])` `[b, n, D]` in the compute dtype (see the class doc)."""
        c, n = self.config, tokens.shape[-1]
        x = self.embed(tokens)
        if self.position_embed is not None:
            if positions is None:
                if n > c.max_positions:
                    raise ValueError(f"tokens: expected at most `max_positions` = "
                                     f"{c.max_positions} positions (the learned position "
                                     f"table); got length {n}.")
                positions = np.arange(n, dtype=np.int32)
            elif not jnp.issubdtype(jnp.asarray(positions).dtype, jnp.integer):
                raise ValueError(f"positions: expected int positions for the learned "
                                 f"position table (`max_positions` = {c.max_positions}); "
                                 f"got {jnp.asarray(positions).dtype}.")
            x = x + self.position_embed(positions)
        if self.type_embed is not None:
            x = x + self.type_embed(jnp.zeros_like(tokens) if token_types is None
                                    else token_types)
        elif token_types is not None:
            raise ValueError("token_types: the model has no token-type table "
                             "(`type_vocab_size` = 0); pass None.")
        return x

    def __call__(self, tokens: jax.Array, *, valid=None, positions=None, mask=None,
                 token_types=None, deterministic: bool | None = None) -> jax.Array:
        """Hidden states `[b, n, D]` of `tokens [b, n]`.

        Args:
          tokens: int token ids `[b, n]`.
          valid: optional `[b, n]` bool/int token validity, True for real tokens; padded
            tokens neither attend nor are attended to.
          positions: optional `[b, n]` or `[n]` int or float positions (default `0…n−1`);
            int only with a learned position table, whose rows they index.
          mask: optional bool attention mask broadcastable to `[b, n, n]`, True = may
            attend (e.g. `ops.prefix_lm_mask`), combined with the padding of `valid`.
          token_types: optional int `[b, n]` segment ids in `[0, type_vocab_size)`
            (default 0 for every token); only with `type_vocab_size > 0`.
          deterministic: disable dropout (None: the module's train/eval setting).
        """
        x = self.embed_inputs(tokens, positions=positions, token_types=token_types)
        hidden, _ = self.transformer(x, positions=positions,
                                     mask=attention_mask_from(valid, mask),
                                     deterministic=deterministic)
        return hidden


class RoFormerMLM(nnx.Module):
    """RoFormer with a masked-LM head: `logits = norm(act(h W + b)) Eᵀ + b_V`.

    `act` is the config's activation (the gate's nonlinearity for GLU variants), as in
    BERT's head. `E` is the input embedding when `tie_embeddings`, otherwise a separate
    `[D, V]` output kernel with logical axes `(embed, vocab)`.
    """

    def __init__(self, config: TransformerConfig, *, tie_embeddings: bool = True,
                 rngs: nnx.Rngs):
        c = config
        self.config = config
        self.activation = ACTIVATION_FUNCTIONS[c.activation]
        self.encoder = RoFormerEncoder(config, rngs=rngs)
        self.transform = Dense(c.width, c.width, in_axes=("embed",), out_axes=(None,),
                               dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                               init_std=c.init_std, rngs=rngs)
        self.transform_norm = Norm(c.width, kind=c.norm, epsilon=c.norm_epsilon,
                                   dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
        self.decoder = None if tie_embeddings else Dense(
            c.width, c.vocab_size, in_axes=("embed",), out_axes=("vocab",), use_bias=False,
            dtype=c.compute_dtype, param_dtype=c.weight_dtype, init_std=c.init_std, rngs=rngs)
        self.output_bias = make_param(rngs, nnx.initializers.zeros, (c.vocab_size,),
                                      ("vocab",), c.weight_dtype)

    def __call__(self, tokens, *, valid=None, positions=None, mask=None,
                 token_types=None, predict_positions=None,
                 deterministic: bool | None = None) -> jax.Array:
        """float32 vocabulary logits `[b, n, V]` (arguments as `RoFormerEncoder`).

        With int `predict_positions` `[b, P]` (indices into the n tokens), the head runs
        at those positions only and the logits are `[b, P, V]`: the masked-LM loss needs
        the masked positions alone, and the vocabulary projection is most of a small
        model's step (`data.mlm_max_predictions` lists them).
        """
        h = self.encoder(tokens, valid=valid, positions=positions, mask=mask,
                         token_types=token_types, deterministic=deterministic)
        if predict_positions is not None:
            predict_positions = jnp.asarray(predict_positions)
            if (predict_positions.ndim != 2 or predict_positions.shape[0] != h.shape[0]
                    or not jnp.issubdtype(predict_positions.dtype, jnp.integer)):
                raise ValueError(f"predict_positions: expected int [batch={h.shape[0]}, P], "
                                 f"got {predict_positions.dtype} {predict_positions.shape}")
            h = jnp.take_along_axis(h, predict_positions[..., None], axis=1)
        h = self.transform_norm(self.activation(self.transform(h)))
        logits = self.encoder.embed.attend(h) if self.decoder is None else self.decoder(h)
        return logits.astype(jnp.float32) + self.output_bias[...].astype(jnp.float32)


class GlobalPointerNER(nnx.Module):
    """RoFormer encoder + GlobalPointer span head (kexue.fm/archives/8373, 8877).

    GlobalPointer: per type `α`, `q_α = h W_q,α + b`, `k_α = h W_k,α + b` (kernels
    `[D, types, d_gp]`, axes `(embed, types, head_dim)`), logits from
    `ops.global_pointer_logits`. Efficient GlobalPointer: one shared `q, k`
    (`[D, d_gp]` each) plus start/end biases `[q; k] W_s`, `[q; k] W_e` (`[2 d_gp,
    types]`), logits from `ops.efficient_global_pointer_logits`. Both rotate `q, k` by
    RoPE with the encoder's `rope_base` and `rope_layout` (`rope=False`, config key
    `model.gp_rope`, leaves them unrotated: the span score then cannot see `j − i`
    except through the encoder's hidden states, the ablation of archive 8373).

    Initialisation: the encoder draws its kernels from N(0, `init_std`²); the head
    kernels (`query`, `key` and, for Efficient GlobalPointer, `bias_start`,
    `bias_end`) follow the reference layers (bert4keras `GlobalPointer` and
    `EfficientGlobalPointer`, whose kernel initializer is `lecun_normal`): a normal
    truncated at two standard deviations, rescaled to std `1/√fan_in`, with `fan_in`
    the contracted size (`D` for `query` and `key`, `2 d_gp` for the biases).
    `head_init_std` replaces that by N(0, `head_init_std`²) (e.g. `init_std`).
    Biases start at 0.
    """

    def __init__(self, config: TransformerConfig, *, num_types: int, head_dim: int = 64,
                 efficient: bool = False, loss: str = "dense", rope: bool = True,
                 head_init_std: float | None = None, rngs: nnx.Rngs):
        if not isinstance(rope, bool | np.bool_):
            raise argument_error("rope", "a bool", rope)
        if head_init_std is not None:
            check_number("head_init_std", head_init_std)
        check_positive_int("num_types", num_types)
        check_positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"`head_dim`: expected an even int (RoPE "
                             f"rotates pairs); got {head_dim!r}.")
        check_choice("loss", loss, GP_LOSSES)
        c = config
        self.config, self.num_types, self.efficient, self.loss_kind = c, num_types, efficient, loss
        self.rope = bool(rope)
        self.encoder = RoFormerEncoder(c, rngs=rngs)
        dense = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs,
                     **_head_init(head_init_std))
        if efficient:
            self.query = Dense(c.width, head_dim, in_axes=("embed",), out_axes=("head_dim",),
                               **dense)
            self.key = Dense(c.width, head_dim, in_axes=("embed",), out_axes=("head_dim",),
                             **dense)
            self.bias_start = Dense(2 * head_dim, num_types, in_axes=("head_dim",),
                                    out_axes=("types",), **dense)
            self.bias_end = Dense(2 * head_dim, num_types, in_axes=("head_dim",),
                                  out_axes=("types",), **dense)
        else:
            self.query = Dense(c.width, (num_types, head_dim), in_axes=("embed",),
                               out_axes=("types", "head_dim"), **dense)
            self.key = Dense(c.width, (num_types, head_dim), in_axes=("embed",),
                             out_axes=("types", "head_dim"), **dense)

    def __call__(self, tokens, *, valid=None, positions=None, mask=None,
                 deterministic: bool | None = None) -> jax.Array:
        """float32 span logits `[b, types, n, n]`; impossible spans are large negative.

        `valid [b, n]` marks real tokens (spans touching padding are impossible);
        `positions` feed the encoder's RoPE only (the span head always uses `0 … n−1`);
        `mask` is an optional attention mask for the encoder (as `RoFormerEncoder`).
        """
        c = self.config
        h = self.encoder(tokens, valid=valid, positions=positions, mask=mask,
                         deterministic=deterministic)
        q = self.query(h).astype(jnp.float32)
        k = self.key(h).astype(jnp.float32)
        if self.efficient:
            qk = jnp.concatenate([q, k], axis=-1)
            return ops.efficient_global_pointer_logits(
                q, k, self.bias_start(qk).astype(jnp.float32),
                self.bias_end(qk).astype(jnp.float32), valid=valid, rope=self.rope,
                base=c.rope_base, layout=c.rope_layout)
        return ops.global_pointer_logits(q, k, valid=valid, rope=self.rope, base=c.rope_base,
                                         layout=c.rope_layout)

    @staticmethod
    def span_validity(logits: jax.Array, valid=None) -> jax.Array:
        """Bool `[b, 1, n, n]`: span `(i, j)` exists (`i ≤ j`, both ends real tokens)."""
        b, _, n, _ = logits.shape
        exists = jnp.triu(jnp.ones((n, n), bool))
        if valid is not None:
            token = jnp.asarray(valid).astype(bool)
            exists = exists & token[:, None, :, None] & token[:, None, None, :]
        return jnp.broadcast_to(exists, (b, 1, n, n))

    def loss(self, logits: jax.Array, labels: jax.Array, *, valid=None) -> jax.Array:
        """Mean ZLPR loss over examples and types (each type is one multi-label problem).

        Args:
          logits: `[b, types, n, n]` from `__call__`.
          labels: the gold spans as int rows `[b, P, 3]` of `(type, start, end)`, padded
            with rows of −1 (the `spans` of a `kexue.data` NER batch). The dense loss
            turns them into 0/1 labels (`ops.spans_to_dense`) and also takes such labels
            `[b, types, n, n]` directly; the sparse loss reads the flat indices
            (`ops.spans_to_flat`, `ops.sparse_zlpr_loss`) and builds no dense tensor.
          valid: optional `[b, n]` token validity; spans touching padding, and spans
            with `end < start`, are excluded.
        """
        b, types, n, _ = logits.shape
        exists = self.span_validity(logits, valid)
        labels = jnp.asarray(labels)
        rows = labels.ndim == 3 and labels.shape[0] == b and labels.shape[-1] == 3
        if self.loss_kind == "dense":
            if rows:
                labels = ops.spans_to_dense(labels, types, n)
            elif labels.shape != logits.shape:
                raise ValueError(f"`labels` for the dense GlobalPointer loss must be spans "
                                 f"[b={b}, P, 3] of (type, start, end) or 0/1 labels of the "
                                 f"logits' shape {logits.shape}; got {labels.shape}.")
            per_type = ops.zlpr_loss(logits, labels, where=exists, axis=(-2, -1))
        else:
            if not rows:
                raise ValueError(f"`labels` for the sparse GlobalPointer loss must be spans "
                                 f"[b={b}, P, 3] of (type, start, end); got {labels.shape}.")
            # Type α owns the flat classes α·n² … (α+1)·n² − 1, so its positives among
            # `[b, types, n²]` are the flat indices minus α·n²; the spans of other types
            # (and the −1 padding) fall outside [0, n²), which sparse_zlpr_loss ignores.
            flat = ops.spans_to_flat(labels, types, n)
            per_type_labels = flat[:, None, :] - (jnp.arange(types) * n * n)[None, :, None]
            per_type = ops.sparse_zlpr_loss(logits.reshape(b, types, n * n), per_type_labels,
                                            where=exists.reshape(b, 1, n * n))
        return jnp.mean(per_type)

    def rdrop_loss(self, logits_a: jax.Array, logits_b: jax.Array, labels: jax.Array, *,
                   alpha: float, valid=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """R-Drop objective over two dropout passes (kexue.fm/archives/8496, 9039).

        `½ (L(s) + L(t)) + (α / 4) · mean_{b, types} D(s, t)`, with `L` this model's ZLPR
        `loss`, `D(s, t) = Σ_{i ≤ j} (σ(s) − σ(t)) (s − t)` the GlobalPointer symmetric KL
        (`ops.global_pointer_kl`, summed over the valid spans of one example and type).
        Archive 8496 writes the R-Drop loss as `L₁ + L₂ + (α/2)(KL(P₁‖P₂) + KL(P₂‖P₁))`
        per example; this is half of it (the scale of a single-pass loss), the same
        `α / 4` as the post's implementation, where `α = 4` was used.

        Args:
          logits_a, logits_b: `[b, types, n, n]` logits of two passes (different dropout).
          labels, valid: as for `loss`.
          alpha: weight `α ≥ 0` of the divergence (0: the mean of the two losses).

        Returns:
          `(loss, {"zlpr": ½ (L(s) + L(t)), "gp_kl": mean D(s, t)})`, float32 scalars.
        """
        zlpr = 0.5 * (self.loss(logits_a, labels, valid=valid)
                      + self.loss(logits_b, labels, valid=valid))
        divergence = jnp.mean(ops.global_pointer_kl(
            logits_a, logits_b, where=self.span_validity(logits_a, valid), axis=(-2, -1)))
        return zlpr + 0.25 * alpha * divergence, {"zlpr": zlpr, "gp_kl": divergence}

    @staticmethod
    def decode(logits: jax.Array, *, max_spans: int, threshold: float = 0.0,
               valid=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The `max_spans` best spans with `logit > threshold`, per example.

        `ops.decode_spans`: `(spans int32 [b, max_spans, 3] of (type, start, end)
        padded with −1, scores [b, max_spans], count int32 [b])`; jit-safe.
        """
        return ops.decode_spans(logits, max_spans=max_spans, threshold=threshold, valid=valid)


def _head_init(head_init_std: float | None) -> dict:
    """`Dense` arguments for a GlobalPointer head kernel (see `GlobalPointerNER`)."""
    if head_init_std is not None:
        return {"init_std": float(head_init_std)}
    return {"kernel_init": _lecun_normal_over_inputs}


def _lecun_normal_over_inputs(key: jax.Array, shape, dtype) -> jax.Array:
    """`lecun_normal` of a `Dense` kernel: `fan_in` is the first axis (the contracted
    input; the head kernels have one input axis), every other axis an output."""
    init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=tuple(range(1, len(shape))))
    return init(key, shape, dtype)


def bio_num_tags(num_types: int) -> int:
    """`2·types + 1` BIO tags: `0` = O, `1 + 2α` = B-α, `2 + 2α` = I-α."""
    return 2 * num_types + 1


def bio_tags_from_spans(spans: jax.Array, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """BIO tags `[b, n]` from `(type, start, end)` rows `[b, P, 3]` (−1 rows: padding).

    BIO gives each token one tag, so overlapping (nested or crossing) spans cannot all
    be written. Rule: a span is kept unless it overlaps a span that starts earlier,
    or starts at the same token and is longer, or has the same extent and a smaller
    type; kept spans never overlap each other (of two overlapping spans one outranks
    the other). Tag ids as `bio_num_tags`.

    Returns:
      `(tags [b, n] int32, kept [b, P] bool)`: `kept` is False for padding rows and for
      the gold spans the tags cannot represent.
    """
    spans = jnp.asarray(spans).astype(jnp.int32)
    kind, start, end = spans[..., 0], spans[..., 1], spans[..., 2]
    real = (kind >= 0) & (start >= 0) & (end >= start) & (end < seq_len)
    # overlap[b, p, r]: span r overlaps span p; outranks[b, p, r]: r has priority over p.
    overlap = ((start[:, :, None] <= end[:, None, :]) & (start[:, None, :] <= end[:, :, None])
               & real[:, :, None] & real[:, None, :])
    length_p, length_r = (end - start)[:, :, None], (end - start)[:, None, :]
    outranks = ((start[:, None, :] < start[:, :, None])
                | ((start[:, None, :] == start[:, :, None])
                   & ((length_r > length_p)
                      | ((length_r == length_p) & (kind[:, None, :] < kind[:, :, None])))))
    kept = real & ~jnp.any(overlap & outranks, axis=-1)
    position = jnp.arange(seq_len)[None, None, :]
    begins = kept[..., None] & (position == start[..., None])                     # [b, P, n]
    inside = kept[..., None] & (position > start[..., None]) & (position <= end[..., None])
    tags = jnp.sum(begins * (1 + 2 * kind)[..., None] + inside * (2 + 2 * kind)[..., None],
                   axis=1)
    return tags.astype(jnp.int32), kept


def bio_span_scores(tags: jax.Array, num_types: int, *, valid=None) -> jax.Array:
    """Decoded BIO spans as GlobalPointer-shaped scores `[b, types, n, n]`: +1 / −1.

    A span `(α, i, j)` is decoded iff token `i` is B-α, tokens `i+1 … j` are I-α and
    token `j+1` is not I-α (or `j` is the last token): a B starts a span, the I's of
    its type that follow extend it, and an I that does not continue a span of its type
    (after O, another type, or the sequence start) starts nothing. Padding tokens
    (`valid` False) read as O. The scores feed `ops.span_f1` / `ops.decode_spans` at
    threshold 0, like GlobalPointer logits.

    Args:
      tags: int `[b, n]` tag ids (`bio_num_tags`).
      num_types: entity types.
      valid: optional `[b, n]` token validity.
    """
    tags = jnp.asarray(tags).astype(jnp.int32)
    if valid is not None:
        tags = jnp.where(jnp.asarray(valid).astype(bool), tags, 0)
    types = jnp.arange(num_types)
    is_begin = tags[:, None, :] == (1 + 2 * types)[None, :, None]              # [b, T, n]
    is_inside = tags[:, None, :] == (2 + 2 * types)[None, :, None]
    breaks = jnp.cumsum(~is_inside, axis=-1)  # equal at i and j iff i+1 … j are all I-α
    continues = jnp.concatenate([is_inside[..., 1:], jnp.zeros_like(is_inside[..., :1])],
                                axis=-1)
    n = tags.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), bool))
    spans = (is_begin[..., :, None] & (breaks[..., :, None] == breaks[..., None, :])
             & ~continues[..., None, :] & upper)
    return jnp.where(spans, 1.0, -1.0).astype(jnp.float32)


class BIOTagger(nnx.Module):
    """RoFormer encoder + a linear softmax head over BIO tags: the token-level baseline.

    `logits = h W + b` with `W` of shape `[D, 2·types + 1]` (axes `(embed, classes)`);
    trained by softmax cross-entropy over the real tokens, decoded to spans by
    `bio_span_scores`. Used against `GlobalPointerNER` on the same encoder (archive
    8373 compares GlobalPointer with CRF tagging).
    """

    def __init__(self, config: TransformerConfig, *, num_types: int, rngs: nnx.Rngs):
        check_positive_int("num_types", num_types)
        c = config
        self.config, self.num_types = c, num_types
        self.encoder = RoFormerEncoder(c, rngs=rngs)
        self.head = Dense(c.width, bio_num_tags(num_types), in_axes=("embed",),
                          out_axes=("classes",), dtype=c.compute_dtype,
                          param_dtype=c.weight_dtype, init_std=c.init_std, rngs=rngs)

    def __call__(self, tokens, *, valid=None, positions=None, mask=None,
                 deterministic: bool | None = None) -> jax.Array:
        """float32 tag logits `[b, n, 2·types + 1]` (arguments as `RoFormerEncoder`)."""
        h = self.encoder(tokens, valid=valid, positions=positions, mask=mask,
                         deterministic=deterministic)
        return self.head(h).astype(jnp.float32)

    @staticmethod
    def loss(logits: jax.Array, labels: jax.Array, *, valid=None) -> jax.Array:
        """Mean softmax cross-entropy of int tag `labels [b, n]` over the real tokens.

        `valid [b, n]` marks the real tokens (None: all count).
        """
        weights = None if valid is None else jnp.asarray(valid).astype(jnp.float32)
        return cross_entropy(logits, labels, weights)

    def span_scores(self, logits: jax.Array, *, valid=None) -> jax.Array:
        """`bio_span_scores` of the arg-max tags: `[b, types, n, n]` of ±1."""
        return bio_span_scores(jnp.argmax(logits, axis=-1), self.num_types, valid=valid)

    def decode(self, logits: jax.Array, *, max_spans: int,
               valid=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The spans of the arg-max tags, as `GlobalPointerNER.decode` returns them
        (`ops.decode_spans` of `span_scores`; every score is 1); jit-safe."""
        return ops.decode_spans(self.span_scores(logits, valid=valid), max_spans=max_spans)


class MultiLabelClassifier(nnx.Module):
    """RoFormer encoder, pooled (first token or masked mean), → `[D, C]` class scores.

    Trained with the ZLPR loss (kexue.fm/archives/7359); class `c` is predicted iff its
    score is positive.
    """

    def __init__(self, config: TransformerConfig, *, num_classes: int, pooling: str = "cls",
                 rngs: nnx.Rngs):
        check_positive_int("num_classes", num_classes)
        check_choice("pooling", pooling, POOLINGS)
        c = config
        self.pooling = pooling
        self.encoder = RoFormerEncoder(c, rngs=rngs)
        self.head = Dense(c.width, num_classes, in_axes=("embed",), out_axes=("classes",),
                          dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                          init_std=c.init_std, rngs=rngs)

    def __call__(self, tokens, *, valid=None, positions=None, mask=None,
                 deterministic: bool | None = None) -> jax.Array:
        """float32 class scores `[b, C]` (arguments as `RoFormerEncoder`; mean pooling
        averages over the `valid` tokens)."""
        h = self.encoder(tokens, valid=valid, positions=positions, mask=mask,
                         deterministic=deterministic)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            weights = (jnp.ones(h.shape[:2], jnp.float32) if valid is None
                       else jnp.asarray(valid).astype(jnp.float32))
            total = jnp.einsum("bn,bnd->bd", weights, h.astype(jnp.float32))
            pooled = total / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1.0)
        return self.head(pooled).astype(jnp.float32)

    @staticmethod
    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        """Mean ZLPR loss; `labels [b, C]` hard 0/1 or soft in `[0, 1]`."""
        return jnp.mean(ops.zlpr_loss(logits, labels))
