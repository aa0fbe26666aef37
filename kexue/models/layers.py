"""Transformer building blocks in Flax NNX, each parameter named by logical axes.

Every parameter is an `nnx.Param` carrying `out_sharding=(logical names…)` metadata,
which `kexue.parallel.nnx_state_shardings` maps onto the `(data, fsdp, tensor)` mesh:

| parameter                 | shape                     | logical axes                      |
|---------------------------|---------------------------|-----------------------------------|
| token embedding           | `[V, D]`                  | `(vocab, embed)`                  |
| position embedding        | `[P, D]`                  | `(positions, embed)`              |
| token-type embedding      | `[T, D]`                  | `(token_types, embed)`            |
| query projection          | `[D, h, d]`               | `(embed, heads, head_dim)`        |
| key / value projection    | `[D, h_kv, d]`            | `(embed, kv_heads, head_dim)`     |
| attention output          | `[h, d, D]`               | `(heads, head_dim, embed)`        |
| FFN in (and gate)         | `[D, F]`                  | `(embed, mlp)`                    |
| FFN out                   | `[F, D]`                  | `(mlp, embed)`                    |
| norm scale / bias         | `[D]`                     | `(norm,)`                         |

Hidden states are constrained to `(batch, length, embed)` when a mesh is set with
`jax.set_mesh`, and left alone otherwise. Matmuls run in `TransformerConfig.dtype`;
norms and softmax statistics in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kexue import ops
from kexue.models.config import TransformerConfig
from kexue.parallel.rules import with_logical_constraint

Axes = tuple[str | None, ...]
HIDDEN_AXES: Axes = ("batch", "length", "embed")

#: `TransformerConfig.remat` → `jax.checkpoint` policy (what the forward pass keeps).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

#: `jax.jit(..., compiler_options=...)` for remat on XLA:CPU. With the default CPU
#: scheduler the recomputation is ordered as early as the forward pass, so remat
#: saves no memory there (compiled temp bytes of the gradient of a 4-layer, width-64
#: LM at length 256: 20.7 MiB with and without ``remat="full"``); the memory-optimised
#: scheduler keeps each block's recomputation next to its backward pass (17.0 MiB
#: plain, 8.8 MiB with ``"full"``). Other backends schedule for memory already.
REMAT_CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def make_param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes,
               dtype) -> nnx.Param:
    """An `nnx.Param` of `shape` from `init(key, shape, dtype)` tagged with logical `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} name {len(axes)} dims for shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


class Dense(nnx.Module):
    """`y = x · W + b`, contracting the last `len(in_shape)` axes of `x`.

    `W` has shape `in_shape + out_shape` and logical axes `in_axes + out_axes`; the
    bias has `out_shape` and `out_axes`. Inputs and weights are cast to `dtype`. `W`
    is drawn from N(0, init_std²), or by `kernel_init(key, shape, dtype)` when given.
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
                 in_axes: Axes, out_axes: Axes, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 kernel_init: Callable | None = None, rngs: nnx.Rngs):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.dtype = dtype
        init = nnx.initializers.normal(init_std) if kernel_init is None else kernel_init
        self.kernel = make_param(rngs, init, self.in_shape + self.out_shape,
                                 tuple(in_axes) + tuple(out_axes), param_dtype)
        self.bias = (make_param(rngs, nnx.initializers.zeros, self.out_shape,
                                tuple(out_axes), param_dtype) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if tuple(x.shape[-n_in:]) != self.in_shape:
            raise ValueError(f"Dense expects inputs ending in {self.in_shape}; got {x.shape}")
        kernel = self.kernel[...].astype(self.dtype)
        contract = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel,
                                ((contract, tuple(range(n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Embedding table `[V, D]`, logical axes `axes` (tokens: `(vocab, embed)`).

    `attend(x)` computes `x · Eᵀ` (logits over the vocabulary, for tied output layers).
    """

    def __init__(self, vocab_size: int, width: int, *, axes: Axes = ("vocab", "embed"),
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = make_param(rngs, nnx.initializers.normal(init_std),
                                    (vocab_size, width), axes, param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype),
                          self.embedding[...].astype(self.dtype))


class Norm(nnx.Module):
    """LayerNorm `(x − μ)/√(σ² + ε)·γ + β` or RMSNorm `x/√(mean x² + ε)·γ`, in float32."""

    def __init__(self, width: int, *, kind: str = "layernorm", epsilon: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kind, self.epsilon, self.dtype = kind, epsilon, dtype
        self.scale = make_param(rngs, nnx.initializers.ones, (width,), ("norm",), param_dtype)
        self.bias = (make_param(rngs, nnx.initializers.zeros, (width,), ("norm",), param_dtype)
                     if kind == "layernorm" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(config: TransformerConfig, rngs: nnx.Rngs) -> Norm:
    return Norm(config.width, kind=config.norm, epsilon=config.norm_epsilon,
                dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs)


#: `TransformerConfig.activation` → the nonlinearity (of the gate, for GLU variants).
ACTIVATION_FUNCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu, "gelu_erf": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu, "silu": jax.nn.silu, "geglu": jax.nn.gelu, "swiglu": jax.nn.silu,
}


class FeedForward(nnx.Module):
    """`W_out act(W_in x)`, or gated `W_out (act(W_in x) ⊙ W_gate x)` for GLU variants."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        dense = dict(use_bias=config.use_bias, dtype=config.compute_dtype,
                     param_dtype=config.weight_dtype, init_std=config.init_std, rngs=rngs)
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.wi = Dense(config.width, config.mlp_dim, in_axes=("embed",), out_axes=("mlp",),
                        **dense)
        self.wg = (Dense(config.width, config.mlp_dim, in_axes=("embed",), out_axes=("mlp",),
                         **dense) if config.gated else None)
        self.wo = Dense(config.mlp_dim, config.width, in_axes=("mlp",), out_axes=("embed",),
                        **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.wi(x))
        if self.wg is not None:
            h = h * self.wg(x)
        h = with_logical_constraint(h, ("batch", "length", "mlp"))
        return self.wo(h)


class LayerCache(NamedTuple):
    """Keys and values of one attention layer for `max_length` positions.

    `key`, `value`: `[batch, max_length, h_kv, d]`; positions `≥ index` are unused.
    """

    key: jax.Array
    value: jax.Array


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with RoPE, via `kexue.ops`.

    `q = x W_q`, `k = x W_k`, `v = x W_v` (`h` query heads, `h_kv` key/value heads),
    RoPE on `q` and `k` by `positions` (`apply_rope`, or `apply_rope_nd` for
    `rope_dims > 1`; none with `rotary_dim=0`), then `ops.dot_product_attention` with
    the configured scale, and the output projection `[h, d] → D`.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dense = dict(use_bias=c.use_bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                     init_std=c.init_std, rngs=rngs)
        self.query = Dense(c.width, (c.num_heads, c.head_dim), in_axes=("embed",),
                           out_axes=("heads", "head_dim"), **dense)
        self.key = Dense(c.width, (c.kv_heads, c.head_dim), in_axes=("embed",),
                         out_axes=("kv_heads", "head_dim"), **dense)
        self.value = Dense(c.width, (c.kv_heads, c.head_dim), in_axes=("embed",),
                           out_axes=("kv_heads", "head_dim"), **dense)
        self.out = Dense((c.num_heads, c.head_dim), c.width, in_axes=("heads", "head_dim"),
                         out_axes=("embed",), **dense)
        #: Set by `attention_entropies`: sow each query's attention entropy.
        self.record_entropy = False

    def rotate(self, x: jax.Array, positions) -> jax.Array:
        c = self.config
        if c.rotary_features == 0:  # RoPE off (`rotary_dim=0`)
            return x
        if c.rope_dims == 1:
            return ops.apply_rope(x, positions, base=c.rope_base, layout=c.rope_layout,
                                  rotary_dim=c.rotary_features)
        return ops.apply_rope_nd(x, positions, base=c.rope_base, layout=c.rope_layout,
                                 rotary_dim=c.rotary_features)

    def __call__(self, x: jax.Array, *, positions, mask: jax.Array | None = None,
                 cache: LayerCache | None = None, cache_index: jax.Array | None = None,
                 ) -> tuple[jax.Array, LayerCache | None]:
        """Attention over `x [b, n, D]`.

        Args:
          x: hidden states `[b, n, D]`.
          positions: `[b, n]` / `[n]` positions (int or float), `[…, n, rope_dims]` for
            N-D RoPE.
          mask: an `ops.AttentionMask` (structured: validity, causal flag and offset,
            prefix lengths), or a bool `[b, n, n_k]` or broadcastable (True = may
            attend); with a cache, `n_k = max_length`.
          cache: keys/values of earlier positions; the new ones are written at
            `cache_index` and attention runs over the whole cache.
          cache_index: int32 scalar, the number of positions already in `cache`.

        Returns:
          `(output [b, n, D], updated cache or None)`.
        """
        c = self.config
        q = self.rotate(self.query(x), positions)
        k = self.rotate(self.key(x), positions)
        v = self.value(x)
        q = with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start)
            v = jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start)
            cache = LayerCache(k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        if self.record_entropy:
            self.sow(nnx.Intermediate, "attention_entropy", ops.attention_entropy(
                q, k, mask=mask, scale=c.attention_scale, entropy_base=c.entropy_base))
        out = ops.dot_product_attention(q, k, v, mask=mask, scale=c.attention_scale,
                                        entropy_base=c.entropy_base,
                                        implementation=c.attention_implementation,
                                        block_q=c.attention_block_q,
                                        block_k=c.attention_block_k)
        return self.out(out), cache


def attention_entropies(model: nnx.Module, *args, **kwargs) -> tuple[Any, list[jax.Array]]:
    """`model(*args, **kwargs)` and the attention entropy of each of its attention layers.

    Every `Attention` inside `model` records `ops.attention_entropy` of its queries and
    keys (after RoPE, with its mask and logit scale) while the call runs, through
    `nnx.capture`; nothing is recorded otherwise, and the model is left as it was.
    Entropy-invariant attention (kexue.fm/archives/8823) is meant to keep these level
    as the number of visible keys grows. Call it in evaluation mode (`model.eval()`):
    blocks run under `jax.checkpoint` (training mode with `remat`) record nothing, and
    that is an error here. Works eagerly and inside `nnx.jit`.

    Returns:
      `(output, entropies)`: the model's output and, for each attention layer in the
      order `nnx.iter_modules` visits them (the stack's order), float32 `[b, n_q, h]`
      entropies in nats (0 for a query that sees no key).
    """
    layers = [(path, module) for path, module in nnx.iter_modules(model)
              if isinstance(module, Attention)]
    if not layers:
        raise ValueError(f"`model`: expected a module with `Attention` layers; got a "
                         f"{type(model).__name__} without any.")
    for _, layer in layers:
        layer.record_entropy = True
    try:
        output, captured = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    finally:
        for _, layer in layers:
            layer.record_entropy = False
    flat = dict(nnx.to_flat_state(captured))
    entropies = []
    for path, _ in layers:
        recorded = flat.get((*path, "attention_entropy"))
        if recorded is None:
            raise ValueError(f"attention layer {'.'.join(map(str, path))} recorded no "
                             "entropy (blocks under remat in training mode record none; "
                             "call `model.eval()` first).")
        value = recorded.get_value() if hasattr(recorded, "get_value") else recorded
        entropies.append(value[-1] if isinstance(value, tuple) else value)
    return output, entropies


class TransformerBlock(nnx.Module):
    """Attention and FFN sub-layers with residuals, pre- or post-norm, and dropout.

    pre-norm:  `x ← x + drop(attn(norm₁ x))`, `x ← x + drop(ffn(norm₂ x))`;
    post-norm: `x ← norm₁(x + drop(attn x))`, `x ← norm₂(x + drop(ffn x))`.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.pre_norm = config.norm_position == "pre"
        self.attention = Attention(config, rngs=rngs)
        self.attention_norm = make_norm(config, rngs)
        self.ffn = FeedForward(config, rngs=rngs)
        self.ffn_norm = make_norm(config, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions, mask=None, cache: LayerCache | None = None,
                 cache_index=None, deterministic: bool | None = None,
                 ) -> tuple[jax.Array, LayerCache | None]:
        def drop(y):
            return self.dropout(y, deterministic=deterministic)

        if self.pre_norm:
            y, cache = self.attention(self.attention_norm(x), positions=positions, mask=mask,
                                      cache=cache, cache_index=cache_index)
            x = x + drop(y)
            x = x + drop(self.ffn(self.ffn_norm(x)))
        else:
            y, cache = self.attention(x, positions=positions, mask=mask, cache=cache,
                                      cache_index=cache_index)
            x = self.attention_norm(x + drop(y))
            x = self.ffn_norm(x + drop(self.ffn(x)))
        return with_logical_constraint(x, HIDDEN_AXES), cache


class Transformer(nnx.Module):
    """A stack of `num_layers` blocks over embedded inputs `[b, n, D]`.

    With pre-norm a final norm follows the stack; with post-norm the inputs are
    normalised first (the embedding LayerNorm of RoFormer / BERT). Dropout is applied
    to the (normalised) inputs. With `config.remat` other than ``"none"`` each block
    runs under `nnx.remat` with the policy `REMAT_POLICIES[config.remat]` (not when
    decoding with a cache).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.blocks = nnx.List([TransformerBlock(config, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = make_norm(config, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions=None, mask=None,
                 cache: Sequence[LayerCache] | None = None, cache_index=None,
                 deterministic: bool | None = None,
                 ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Runs the stack; `positions` default to `0 … n−1`; returns `(hidden, cache)`."""
        if positions is None:
            positions = np.arange(x.shape[1], dtype=np.int32)
        if self.config.norm_position == "post":
            x = self.norm(x)
        x = self.dropout(x.astype(self.config.compute_dtype), deterministic=deterministic)
        x = with_logical_constraint(x, HIDDEN_AXES)
        evaluating = deterministic if deterministic is not None else self.dropout.deterministic
        # Remat only matters when gradients are taken: not when decoding, not in eval mode.
        if cache is None and self.config.remat != "none" and not evaluating:
            # Each block under `jax.checkpoint`; the advanced dropout RNG counters flow
            # back out, so the masks are those of the plain call.
            # A pure function of the block's state under `jax.checkpoint` (rather than
            # `nnx.remat`, which refuses modules merged inside `lax.scan`/`eval_shape`,
            # as the evaluation loops do).
            policy = REMAT_POLICIES[self.config.remat]
            for block in self.blocks:
                graphdef, state = nnx.split(block)

                def block_output(state, x, positions, mask, graphdef=graphdef):
                    block = nnx.merge(graphdef, state)
                    y = block(x, positions=positions, mask=mask, deterministic=deterministic)[0]
                    return y, nnx.state(block, nnx.Not(nnx.Param))  # e.g. RNG counters

                x, changed = jax.checkpoint(block_output, policy=policy)(
                    state, x, positions, mask)
                nnx.update(block, changed)
            return self._final_norm(x), None
        new_cache = None if cache is None else []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, positions=positions, mask=mask,
                                   cache=None if cache is None else cache[i],
                                   cache_index=cache_index, deterministic=deterministic)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self._final_norm(x), new_cache

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x) if self.config.norm_position == "pre" else x


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy `−log softmax(logits)[label]`, in float32.

    Args:
      logits: `[..., V]` scores.
      labels: `[...]` integer targets in `[0, V)`.
      weights: optional `[...]` weights (e.g. 1 at masked-LM positions, 0 elsewhere);
        the loss is `Σ w·ce / max(Σ w, 1)`. None weighs every position 1.

    Returns:
      float32 scalar.

    Computed as `logsumexp(logits) − logits[label]` with the label's logit picked by a
    one-hot select-and-sum rather than a gather: on XLA:CPU the gather's gradient is a
    scatter into a zeroed `[..., V]` buffer (two extra passes over the logits), while
    the select fuses with the softmax gradient (6-7% of a RoFormer MLM training step
    at V = 21128; benchmarks/peers.py).
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(classes == labels[..., None], logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    if weights is None:
        return jnp.mean(nll)
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
