"""Masked language modelling, evaluated at several sequence lengths.

Batches (`kexue.data`, task "mlm"): `tokens` int32 `[b, n]` (the corrupted input),
`labels` int32 `[b, n]` (the original tokens), `weights` float32 `[b, n]` (1 at the
chosen positions), `valid` bool `[b, n]` (real tokens) and, with
`data.mlm_max_predictions`, `predict_positions` int32 `[b, P]` / `predict_weights`
float32 `[b, P]` (the model's head then runs at those positions only).

Training positions: "contiguous" (`0 … n−1`) or "random_equal_mean"
(kexue.fm/archives/9444: a length `n' ~ Exponential(mean n)` per example and positions
`linspace(0, 1, n) · n'`, floats fed to RoPE), so a model trained at `n` has seen
positions as far as it will meet at longer evaluation lengths. Evaluation always uses
`0 … L−1`; one stream per length `L` of `eval_lengths` reports `loss_<L>` (nats per
chosen token) and `accuracy_<L>`; `loss` is that of the first length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kexue.models import cross_entropy
from kexue.tasks.base import Sums, ratio

__all__ = ["POSITIONS", "MLMTask", "random_equal_mean_positions"]

POSITIONS = ("contiguous", "random_equal_mean")


def random_equal_mean_positions(rng: jax.Array, batch: int, length: int) -> jax.Array:
    """float32 `[batch, length]`: `linspace(0, 1, length) · n'`, `n' ~ Exp(mean length)`.

    kexue.fm/archives/9444: the positions of each example are spread over a random
    span whose mean is the training length, so their mean matches contiguous
    positions while their range covers longer sequences.
    """
    span = jax.random.exponential(rng, (batch, 1)) * length
    return jnp.linspace(0.0, 1.0, length)[None, :] * span


def _stream(length: int) -> str:
    return f"length_{length}"


@dataclasses.dataclass(frozen=True)
class MLMTask:
    """MLM with `model(tokens, valid=, positions=, predict_positions=) -> logits`.

    Attributes:
      eval_lengths: the evaluation lengths (at least one; the first gives `loss`).
      positions: "contiguous" or "random_equal_mean" (training only).
    """

    eval_lengths: tuple[int, ...]
    positions: str = "contiguous"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_lengths", tuple(self.eval_lengths))
        lengths = self.eval_lengths
        if (not lengths or len(set(lengths)) != len(lengths)
                or not all(isinstance(n, int | np.integer) and not isinstance(n, bool) and n > 0
                           for n in lengths)):
            raise ValueError(f"`eval_lengths`: expected a non-empty tuple of distinct "
                             f"positive ints; got {lengths!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"`positions`: expected one of {list(POSITIONS)}; "
                             f"got {self.positions!r}")

    def loss(self, model: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Sums]:
        positions = None
        if self.positions == "random_equal_mean":
            positions = random_equal_mean_positions(rng, *batch["tokens"].shape)
        if "predict_positions" in batch:  # the head runs at the listed positions only
            where = batch["predict_positions"]
            logits = model(batch["tokens"], valid=batch["valid"], positions=positions,
                           predict_positions=where)
            labels = jnp.take_along_axis(batch["labels"], where, axis=1)
            weights = batch["predict_weights"]
        else:
            logits = model(batch["tokens"], valid=batch["valid"], positions=positions)
            labels, weights = batch["labels"], batch["weights"]
        loss = cross_entropy(logits, labels, weights)
        correct = (jnp.argmax(logits, -1) == labels) * weights
        return loss, {"accuracy": ratio(jnp.sum(correct), jnp.sum(weights))}

    def eval_streams(self) -> dict[str, int | None]:
        return {_stream(length): length for length in self.eval_lengths}

    def eval_stats(self, model: Any, batch: Any, stream: str | None = None) -> Sums:
        del stream  # every stream is scored alike; its batches carry their length
        logits = model(batch["tokens"], valid=batch["valid"])
        weights, labels = batch["weights"], batch["labels"]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == labels) * weights
        return {"nll": jnp.sum(nll * weights), "correct": jnp.sum(correct),
                "masked": jnp.sum(weights)}

    def finalize(self, totals: Mapping[str, Sums]) -> Sums:
        metrics: Sums = {}
        for length in self.eval_lengths:
            total = totals[_stream(length)]
            metrics[f"loss_{length}"] = ratio(total["nll"], total["masked"])
            metrics[f"accuracy_{length}"] = ratio(total["correct"], total["masked"])
        return {"loss": metrics[f"loss_{self.eval_lengths[0]}"], **metrics}

    def tokens_in(self, batch: Any) -> int:
        return int(np.size(batch["tokens"]))
