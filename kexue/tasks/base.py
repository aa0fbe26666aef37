"""The task protocol: a training loss, evaluation as per-batch sums, one finalize.

    task = NERTask(num_types=10)
    loss, aux = task.loss(model, batch, rng)          # training objective
    sums = task.eval_stats(model, batch)              # counts and summed losses
    totals = add_sums(totals, sums)                   # over the whole evaluation set
    metrics = task.finalize({"eval": totals})         # exact metrics, computed once

Evaluation returns *sums* (token counts, summed negative log-likelihoods, tp/fp/fn)
rather than per-batch means, so the metrics over a set are exact whatever its batching
and memory does not grow with its size. A task may evaluate several *streams* of
batches (e.g. the MLM task one per evaluation length): `eval_streams` names them with
the sequence length their batches have (None: the training length), `eval_stats`
takes the stream's name, and `finalize` receives the totals of every stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

__all__ = ["EVAL", "Sums", "Task", "add_sums", "eval_batches", "ratio"]

#: The name of the one evaluation stream of a task that has a single one.
EVAL = "eval"
Sums = dict[str, jax.Array]


class Task(Protocol):
    """What a training task provides (see the module doc)."""

    def loss(self, model: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Sums]:
        """`(scalar loss, dict of scalar metrics)` of one training batch."""
        ...

    def eval_streams(self) -> dict[str, int | None]:
        """Evaluation stream name → sequence length of its batches (None: training)."""
        ...

    def eval_stats(self, model: Any, batch: Any, stream: str = EVAL) -> Sums:
        """Sums over one evaluation batch of `stream` (added across batches)."""
        ...

    def finalize(self, totals: Mapping[str, Sums]) -> Sums:
        """Metrics (with a `loss`) from the totals of every stream."""
        ...

    def tokens_in(self, batch: Any) -> int:
        """Tokens in one host batch (for tokens/s)."""
        ...


def add_sums(total: Sums | None, sums: Sums) -> Sums:
    """`total + sums` key by key (`total` None: `sums`)."""
    if total is None:
        return dict(sums)
    if set(total) != set(sums):
        raise ValueError(f"`sums` must have the keys of `total` {sorted(total)}; "
                         f"got {sorted(sums)}")
    return {key: total[key] + sums[key] for key in total}


def ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """`numerator / denominator`, 0 where the denominator is 0."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def eval_batches(task: Task, batches_at: Callable[[int | None], Iterable[Any]]
                 ) -> Iterator[tuple[str, Any]]:
    """`(stream, batch)` for every stream of `task`, in order.

    `batches_at(seq_len)` gives a fresh iterable of the evaluation batches at that
    sequence length (None: the training length).
    """
    for stream, seq_len in task.eval_streams().items():
        for batch in batches_at(seq_len):
            yield stream, batch
