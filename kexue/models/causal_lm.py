"""Decoder-only causal language model with a key/value cache and sampling.

`CausalLM(tokens)` gives next-token logits for every position (causal mask).
Decoding keeps the keys and values of earlier positions in a `KVCache` (an explicit
pytree, passed in and returned, so decoding stays a pure function under `jax.jit`):
`decode(tokens, cache)` runs only the new tokens, writes their keys/values at
`cache.index`, and attends over the cache with the mask "key `j` visible to query `i`
iff `j ≤ index + i`". The visible-key counts, hence the entropy-invariant scale, are
those of the full forward pass, so cached logits equal full logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kexue import ops
from kexue.models.config import (
    TransformerConfig,
    check_no_embedding_tables,
    check_positive_int,
)
from kexue.models.layers import Dense, Embed, LayerCache, Transformer

#: Logical axes of each cached key / value array, for sharding a cache.
CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    """Per-layer keys and values `[b, max_length, h_kv, d]`; `index`: positions filled."""

    layers: tuple[LayerCache, ...]
    index: jax.Array


class CausalLM(nnx.Module):
    """Token embedding, causal transformer stack, vocabulary logits.

    The output layer is the transposed input embedding when `tie_embeddings`, else a
    `[D, V]` kernel with logical axes `(embed, vocab)` (no bias).
    """

    def __init__(self, config: TransformerConfig, *, tie_embeddings: bool = False,
                 rngs: nnx.Rngs):
        c = config
        check_positive_int("vocab_size", c.vocab_size)
        check_no_embedding_tables(c, "causal_lm")
        self.config = c
        self.embed = Embed(c.vocab_size, c.width, dtype=c.compute_dtype,
                           param_dtype=c.weight_dtype, init_std=c.init_std, rngs=rngs)
        self.transformer = Transformer(c, rngs=rngs)
        self.lm_head = None if tie_embeddings else Dense(
            c.width, c.vocab_size, in_axes=("embed",), out_axes=("vocab",), use_bias=False,
            dtype=c.compute_dtype, param_dtype=c.weight_dtype, init_std=c.init_std, rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, valid=None, positions=None, mask=None,
                 deterministic: bool | None = None) -> jax.Array:
        """float32 next-token logits `[b, n, V]` for `tokens [b, n]`.

        `valid [b, n]` marks real tokens (padding neither attends nor is attended to);
        `positions` default to `0 … n−1`; `mask`, an optional bool attention mask
        broadcastable to `[b, n, n]` (True = may attend), further restricts the causal
        one.
        """
        attention_mask = ops.AttentionMask(valid=valid, causal=True, mask=mask)
        hidden, _ = self.transformer(self.embed(tokens), positions=positions,
                                     mask=attention_mask, deterministic=deterministic)
        return self.logits(hidden)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache for `max_length` positions (dtype: the compute dtype)."""
        c = self.config
        shape = (batch_size, max_length, c.kv_heads, c.head_dim)
        dtype = c.compute_dtype if dtype is None else dtype
        layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                       for _ in range(c.num_layers))
        return KVCache(layers, jnp.zeros((), jnp.int32))

    def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits of `tokens [b, q]` placed after the `cache.index` cached positions.

        Returns `(logits [b, q, V] float32, cache with index + q)`. Dropout is off.
        The caller keeps `index + q ≤ max_length`.
        """
        q_len = tokens.shape[-1]
        positions = cache.index + jnp.arange(q_len, dtype=jnp.int32)
        mask = ops.AttentionMask(causal=True, q_offset=cache.index)  # key j ≤ index + i
        hidden, layers = self.transformer(self.embed(tokens), positions=positions, mask=mask,
                                          cache=cache.layers, cache_index=cache.index,
                                          deterministic=True)
        return self.logits(hidden), KVCache(tuple(layers), cache.index + q_len)

    def _sampling_keys(self, max_new_tokens: int, rng: jax.Array | None, temperature: float,
                       top_k: int | None, top_p: float | None) -> jax.Array:
        """Checks the sampling arguments; the key of each new token, `[max_new_tokens]`."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive int; got {max_new_tokens!r}.")
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                       vocab_size=self.config.vocab_size)
        if temperature > 0 and rng is None:
            raise ValueError("`rng` (a jax.random key) is required when temperature > 0.")
        if rng is None:
            return jax.random.split(jax.random.key(0), max_new_tokens)  # unused: greedy
        return jax.random.split(rng, max_new_tokens)

    def generate(self, prompt: jax.Array, *, max_new_tokens: int,
                 rng: jax.Array | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None) -> jax.Array:
        """Continue `prompt [b, n]` by `max_new_tokens` tokens; returns `[b, n + new]`.

        `temperature == 0` is greedy (argmax). Otherwise tokens are drawn by
        `sample_logits` (temperature, then top-k, then top-p); `rng` (a `jax.random`
        key) is then required and fully determines the sample: new token `t` uses
        `jax.random.split(rng, max_new_tokens)[t]`, as `stream` does. The prompt is
        run once (prefill), then one token per step inside `jax.lax.scan` over a cache
        of `n + max_new_tokens` positions.
        """
        keys = self._sampling_keys(max_new_tokens, rng, temperature, top_k, top_p)
        batch, n = prompt.shape

        def sample(logits, key):
            return sample_logits(logits, key, temperature=temperature, top_k=top_k,
                                 top_p=top_p)

        logits, cache = self.decode(prompt, self.init_cache(batch, n + max_new_tokens))
        first = sample(logits[:, -1], keys[0])
        graphdef, state = nnx.split(self)

        def step(carry, key):
            token, cache = carry
            model = nnx.merge(graphdef, state)
            logits, cache = model.decode(token[:, None], cache)
            nxt = sample(logits[:, -1], key)
            return (nxt, cache), nxt

        _, rest = jax.lax.scan(step, (first, cache), keys[1:])
        new = jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
        return jnp.concatenate([prompt, new.astype(prompt.dtype)], axis=1)

    def stream(self, prompt: jax.Array, *, max_new_tokens: int, rng: jax.Array | None = None,
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None) -> Iterator[jax.Array]:
        """The tokens of `generate`, one int32 `[b]` array per step, as they are drawn.

        Same arguments, same keys, hence the same tokens as `generate`; each step is
        one call of a jitted single-token decode over the cache (compiled once per
        prompt shape), so a caller can print a token before the next is computed and
        stop early. Arguments are checked before the first token is asked for.
        """
        keys = self._sampling_keys(max_new_tokens, rng, temperature, top_k, top_p)
        batch, n = prompt.shape
        graphdef, state = nnx.split(self)

        def decode_and_sample(state, tokens, cache, key):
            logits, cache = nnx.merge(graphdef, state).decode(tokens, cache)
            token = sample_logits(logits[:, -1], key, temperature=temperature, top_k=top_k,
                                  top_p=top_p)
            return token, cache

        prefill = jax.jit(decode_and_sample)
        step = jax.jit(decode_and_sample, donate_argnums=(2,))

        def tokens() -> Iterator[jax.Array]:
            token, cache = prefill(state, prompt, self.init_cache(batch, n + max_new_tokens),
                                   keys[0])
            yield token
            for key in keys[1:]:
                token, cache = step(state, token[:, None], cache, key)
                yield token

        return tokens()


def check_sampling(*, temperature: float, top_k: int | None = None, top_p: float | None = None,
                   vocab_size: int | None = None) -> None:
    """ValueError naming the argument unless `temperature ≥ 0`, `1 ≤ top_k ≤ vocab_size`
    and `0 < top_p ≤ 1` (None: off)."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"`temperature` must be a finite number >= 0; got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
                              or (vocab_size is not None and top_k > vocab_size)):
        raise ValueError(f"`top_k` must be in [1, vocab_size={vocab_size}]; got {top_k!r}.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float)
                              or not 0 < top_p <= 1):
        raise ValueError(f"`top_p` must be in (0, 1]; got {top_p!r}.")


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """One token per row of `logits [b, V]`: argmax, or a temperature / top-k / top-p sample.

    `temperature == 0`: the argmax (`key` unused). Otherwise a draw from
    `softmax(logits / temperature)` restricted first to the `top_k` largest logits,
    then to the nucleus of `top_p` (Holtzman et al., 2020, arXiv 1904.09751): the
    most likely tokens, in order, whose probabilities (after the top-k cut) sum to at
    least `top_p` — a token is kept iff the tokens more likely than it sum to less
    than `top_p`, so the most likely token always is. Returns int32 `[b]`.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    if top_p is not None and top_p < 1:
        order = jnp.argsort(-scaled, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = jnp.take_along_axis(before < top_p, jnp.argsort(order, axis=-1), axis=-1)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
