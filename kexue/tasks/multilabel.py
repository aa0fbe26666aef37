"""Multi-label classification: ZLPR (kexue.fm/archives/7359) or per-class sigmoid BCE.

Batches (`kexue.data`, task "multilabel"): `tokens` int32 `[b, n]`, `valid` bool
`[b, n]`, `type_labels` int32 `[b, C]` (1 where the class occurs) and
`example_weights` float32 `[b]` (0 on padding rows).

Both losses decide at score 0 (ZLPR by construction, sigmoid at probability ½).
Evaluation reports `loss`, `micro_f1` / `micro_precision` / `micro_recall` (tp/fp/fn
summed over classes and the set), `macro_f1` (the mean of the per-class F1) and
`f1_<name>` per class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kexue import ops
from kexue.ops._checks import check_int
from kexue.tasks.base import EVAL, Sums, ratio

__all__ = ["LOSSES", "MultiLabelTask"]

LOSSES = ("zlpr", "sigmoid_bce")


@dataclasses.dataclass(frozen=True)
class MultiLabelTask:
    """`model(tokens, valid=) -> scores [b, C]`, one score per class.

    Attributes:
      num_classes: `C`.
      loss_kind: "zlpr" or "sigmoid_bce".
      class_names: names for the per-class metrics (default `class0`, `class1`, ...).
    """

    num_classes: int
    loss_kind: str = "zlpr"
    class_names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes)
        if self.loss_kind not in LOSSES:
            raise ValueError(f"`loss_kind`: expected one of {list(LOSSES)}; "
                             f"got {self.loss_kind!r}")
        names = (tuple(f"class{i}" for i in range(self.num_classes))
                 if self.class_names is None else tuple(self.class_names))
        if len(names) != self.num_classes:
            raise ValueError(f"`class_names`: expected {self.num_classes} names; "
                             f"got {len(names)}")
        object.__setattr__(self, "class_names", names)

    def _summed_loss(self, logits: jax.Array, labels: jax.Array,
                     weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        labels = labels.astype(jnp.float32)
        if self.loss_kind == "zlpr":
            per_example = ops.zlpr_loss(logits, labels)
        else:
            per_example = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
        return jnp.sum(per_example * weights), jnp.sum(weights)

    def loss(self, model: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Sums]:
        del rng
        logits = model(batch["tokens"], valid=batch["valid"])
        total, rows = self._summed_loss(logits, batch["type_labels"], batch["example_weights"])
        return ratio(total, rows), {}

    def eval_streams(self) -> dict[str, int | None]:
        return {EVAL: None}

    def eval_stats(self, model: Any, batch: Any, stream: str = EVAL) -> Sums:
        del stream
        logits = model(batch["tokens"], valid=batch["valid"])
        weights = batch["example_weights"][:, None]
        predicted = (logits > 0) * weights
        gold = (batch["type_labels"] > 0) * weights
        total, rows = self._summed_loss(logits, batch["type_labels"], batch["example_weights"])
        return {"tp": jnp.sum(predicted * gold, 0), "fp": jnp.sum(predicted * (1 - gold), 0),
                "fn": jnp.sum((1 - predicted) * gold, 0), "loss_sum": total, "rows": rows}

    def finalize(self, totals: Mapping[str, Sums]) -> Sums:
        total = totals[EVAL]
        micro = ops.f1_from_counts(*(jnp.sum(total[c]) for c in ("tp", "fp", "fn")))
        per_class = ops.f1_from_counts(total["tp"], total["fp"], total["fn"])["f1"]
        return {"loss": ratio(total["loss_sum"], total["rows"]),
                "micro_f1": micro["f1"], "micro_precision": micro["precision"],
                "micro_recall": micro["recall"],
                "macro_f1": jnp.sum(per_class) / self.num_classes,
                **{f"f1_{name}": per_class[i] for i, name in enumerate(self.class_names)}}

    def tokens_in(self, batch: Any) -> int:
        return int(np.sum(batch["valid"]))

    def predict(self, model: Any, tokens: jax.Array, valid: jax.Array) -> jax.Array:
        """float32 class scores `[b, C]` of `tokens [b, n]` (`valid [b, n]`, the model in
        eval mode); class `c` is predicted iff its score is > 0, the decision of both
        losses (ZLPR by construction, sigmoid BCE at probability ½)."""
        return model(tokens, valid=valid).astype(jnp.float32)
