"""Causal language modelling: next-token loss, evaluation at several context lengths.

Batches (`kexue.data`, task "lm"): `tokens` int32 `[b, n + 1]` (inputs
`tokens[:, :-1]`, targets `tokens[:, 1:]`) and `weights` float32 `[b, n]` (1 where
the target is a real token).

Evaluation reports `loss` (nats per target token), `bits_per_byte` (bits per token:
bytes for the byte tokenizer) and `tokens` over the evaluation batches at the
training length. With `eval_lengths`, windows of `L_max + 1` tokens (`L_max` the
largest length) are cut again into `L_max / L` windows of `L + 1` tokens overlapping
by one — exactly the windows the pipeline makes at length `L` — so every length
predicts the same target tokens once each and only the context differs. Each length is
its own stream (`length_<L>`, reading the same `L_max` windows): one compiled program
per length, so evaluation memory is that of one length, not the sum over lengths.
Per length: `loss_<L>`, `bits_per_byte_<L>`, `perplexity_<L>`, `tokens_<L>`, and the
same over the tail, the target positions `j ≥ ⌊3L/4⌋` of each window
(`loss_tail_<L>`, ...): a window's average mixes in short early contexts, while the
tail is where a model trained shorter has to extrapolate (kexue.fm/archives/8823).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kexue.models import cross_entropy
from kexue.tasks.base import EVAL, Sums, ratio

__all__ = ["LMTask", "length_stream", "split_windows"]


def length_stream(length: int) -> str:
    """The evaluation stream of context length `length` (windows of the longest length,
    cut into windows of `length`)."""
    return f"length_{length}"


def split_windows(batch: Mapping[str, jax.Array], length: int) -> dict[str, jax.Array]:
    """LM windows `[b, N + 1]` → `[b · N/L, L + 1]`, the windows of length `L`.

    Window `j` of a row holds its tokens `j·L … j·L + L` (overlapping the next by one,
    as the pipeline cuts them) and the weights of its targets `j·L … j·L + L − 1`.
    """
    tokens, weights = batch["tokens"], batch["weights"]
    b, n = weights.shape
    if n % length:
        raise ValueError(f"`length` must divide the window length {n}; got {length}")
    pieces = n // length
    inputs = tokens[:, :n].reshape(b, pieces, length)
    last = tokens[:, length::length].reshape(b, pieces, 1)  # the next window's first
    return {"tokens": jnp.concatenate([inputs, last], axis=-1).reshape(b * pieces, length + 1),
            "weights": weights.reshape(b * pieces, length)}


def _check_lengths(eval_lengths: tuple[int, ...]) -> None:
    if not all(isinstance(n, int | np.integer) and not isinstance(n, bool) and n > 0
               for n in eval_lengths) or len(set(eval_lengths)) != len(eval_lengths):
        raise ValueError(f"`eval_lengths`: expected distinct positive ints; "
                         f"got {eval_lengths!r}")
    longest = max(eval_lengths, default=0)
    if any(longest % n for n in eval_lengths):
        raise ValueError(f"`eval_lengths`: expected lengths that divide the largest, "
                         f"{longest} (every length is cut from the same windows of that "
                         f"length); got {eval_lengths!r}")


@dataclasses.dataclass(frozen=True)
class LMTask:
    """Next-token prediction with a model `model(tokens [b, n]) -> logits [b, n, V]`.

    Attributes:
      eval_lengths: context lengths evaluated on one common text (empty: none).
    """

    eval_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_lengths", tuple(self.eval_lengths))
        _check_lengths(self.eval_lengths)

    def loss(self, model: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Sums]:
        del rng
        tokens = batch["tokens"]
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], batch["weights"])
        return loss, {"bits_per_byte": loss / math.log(2)}

    def eval_streams(self) -> dict[str, int | None]:
        streams: dict[str, int | None] = {EVAL: None}
        for length in self.eval_lengths:
            streams[length_stream(length)] = max(self.eval_lengths)
        return streams

    @staticmethod
    def _window_sums(model: Any, batch: Mapping[str, jax.Array]) -> Sums:
        tokens, weights = batch["tokens"], batch["weights"]
        logits = model(tokens[:, :-1])
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        n = weights.shape[1]
        tail = weights * (jnp.arange(n) >= (3 * n) // 4)[None, :]
        return {"nll": jnp.sum(nll * weights), "tokens": jnp.sum(weights),
                "tail_nll": jnp.sum(nll * tail), "tail_tokens": jnp.sum(tail)}

    def eval_stats(self, model: Any, batch: Any, stream: str = EVAL) -> Sums:
        if stream == EVAL:
            return self._window_sums(model, batch)
        length = next((n for n in self.eval_lengths if length_stream(n) == stream), None)
        if length is None:
            raise ValueError(f"`stream`: expected one of {list(self.eval_streams())}; "
                             f"got {stream!r}")
        at = self._window_sums(model, split_windows(batch, length))
        return {f"{name}_{length}": value for name, value in at.items()}

    def finalize(self, totals: Mapping[str, Sums]) -> Sums:
        total = totals[EVAL]
        loss = ratio(total["nll"], total["tokens"])
        metrics = {"loss": loss, "bits_per_byte": loss / math.log(2),
                   "tokens": total["tokens"]}
        for length in self.eval_lengths:
            total = totals[length_stream(length)]
            at = ratio(total[f"nll_{length}"], total[f"tokens_{length}"])
            tail = ratio(total[f"tail_nll_{length}"], total[f"tail_tokens_{length}"])
            metrics.update({
                f"loss_{length}": at, f"bits_per_byte_{length}": at / math.log(2),
                f"perplexity_{length}": jnp.exp(at), f"tokens_{length}": total[f"tokens_{length}"],
                f"loss_tail_{length}": tail, f"bits_per_byte_tail_{length}": tail / math.log(2),
                f"perplexity_tail_{length}": jnp.exp(tail),
                f"tokens_tail_{length}": total[f"tail_tokens_{length}"]})
        return metrics

    def tokens_in(self, batch: Any) -> int:
        return int(np.size(batch["weights"]))
