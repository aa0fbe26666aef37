"""Span NER: GlobalPointer / Efficient GlobalPointer, or the BIO tagging baseline.

Batches (`kexue.data`, task "ner"): `tokens` int32 `[b, n]`, `valid` bool `[b, n]`
(with WordPiece also `offsets` int32 `[b, n, 2]`: spans never start or end at `[CLS]` /
`[SEP]`, see `span_valid`),
`spans` int32 `[b, P, 3]` (the gold `(type, start, end)` rows, end inclusive, padded
with −1), `example_weights` float32 `[b]` (0 on padding rows) and, optionally,
`dropped_spans` int32 `[b]`: gold spans the batch could not hold (beyond the cut
sentence, or not whole word pieces). Dropped spans are reported (`dropped_spans`:
per training batch, and summed over the evaluation set) and count as misses (`fn`)
in evaluation, so the F1 is the one over every gold span of the set.

The model is `kexue.models.GlobalPointerNER` (span logits `[b, types, n, n]`, ZLPR
loss, kexue.fm/archives/8373, 8877) or `kexue.models.BIOTagger` (tag logits, decoded to
span scores by `model.span_scores`); both are scored by the same span precision /
recall / F1 from tp/fp/fn summed over the set (`ops.span_f1`). For the BIO tagger,
`gold_spans` and `bio_unrepresentable` (gold spans the tags cannot hold: overlapping
ones; they stay in the gold set and count as misses) are reported too.

`rdrop_alpha = α > 0` (GlobalPointer only) trains with R-Drop: two dropout passes and
`model.rdrop_loss` (kexue.fm/archives/8496, 9039).

Prediction: `NERTask.predict` gives the chosen spans and their scores as arrays
(jit-safe), `scored_spans` lists them per sentence on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kexue import ops
from kexue.models import bio_tags_from_spans
from kexue.ops._checks import check_int, check_number
from kexue.tasks.base import EVAL, Sums, ratio

__all__ = ["NERTask", "scored_spans", "span_valid"]


def _is_tagger(model: Any) -> bool:
    return hasattr(model, "span_scores")


def span_valid(batch: Any) -> jax.Array:
    """bool `[b, n]`: the tokens a span may start or end at — real tokens that cover
    text. With `offsets` (WordPiece batches) `[CLS]` / `[SEP]` cover none and are left
    out; the encoder still attends to them (`valid`)."""
    valid = batch["valid"]
    if "offsets" not in batch:
        return valid
    offsets = batch["offsets"]
    return valid & (offsets[..., 1] > offsets[..., 0])


def _labels(model: Any, spans: jax.Array, n: int) -> jax.Array:
    """What the model's loss takes: BIO tags `[b, n]` for a tagger, else the span rows."""
    return bio_tags_from_spans(spans, n)[0] if _is_tagger(model) else spans


def _dropped(batch: Any) -> Sums:
    """`{"dropped_spans": their count in the batch}` when the batch reports them."""
    if "dropped_spans" not in batch:
        return {}
    return {"dropped_spans": jnp.sum(jnp.asarray(batch["dropped_spans"], jnp.int32))}


@dataclasses.dataclass(frozen=True)
class NERTask:
    """Span extraction over `num_types` entity types.

    Attributes:
      num_types: entity types (rows of the dense span labels).
      rdrop_alpha: R-Drop weight `α ≥ 0` (0: off; > 0 needs a GlobalPointer model).
    """

    num_types: int
    rdrop_alpha: float = 0.0

    def __post_init__(self) -> None:
        check_int("num_types", self.num_types)
        check_number("rdrop_alpha", self.rdrop_alpha, strict=False)

    def loss(self, model: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Sums]:
        del rng  # dropout draws from the model's own stream
        tokens, valid, spans = batch["tokens"], batch["valid"], batch["spans"]
        logits = model(tokens, valid=valid)
        if self.rdrop_alpha > 0:
            if _is_tagger(model):
                raise ValueError("`rdrop_alpha` > 0 uses the GlobalPointer divergence; "
                                 f"got a {type(model).__name__}")
            again = model(tokens, valid=valid)  # a second pass: new dropout masks
            loss, aux = model.rdrop_loss(logits, again, spans, alpha=self.rdrop_alpha,
                                         valid=span_valid(batch))
            return loss, {**aux, **_dropped(batch)}
        return (model.loss(logits, _labels(model, spans, tokens.shape[1]),
                           valid=span_valid(batch)), _dropped(batch))

    def eval_streams(self) -> dict[str, int | None]:
        return {EVAL: None}

    def eval_stats(self, model: Any, batch: Any, stream: str = EVAL) -> Sums:
        del stream
        tokens, valid, spans = batch["tokens"], batch["valid"], batch["spans"]
        n = tokens.shape[1]
        logits = model(tokens, valid=valid)
        candidates = span_valid(batch)
        tagger = _is_tagger(model)
        scores = model.span_scores(logits, valid=candidates) if tagger else logits
        counts = ops.span_f1(scores, ops.spans_to_dense(spans, self.num_types, n),
                             valid=candidates)
        loss = model.loss(logits, _labels(model, spans, n), valid=candidates)
        rows = jnp.sum(batch["example_weights"])
        sums = {"tp": counts["tp"], "fp": counts["fp"], "fn": counts["fn"],
                "loss_sum": loss * rows, "rows": rows, **_dropped(batch)}
        if "dropped_spans" in sums:
            sums["fn"] = sums["fn"] + sums["dropped_spans"]
        if tagger:
            gold = jnp.sum(spans[..., 0] >= 0)
            kept = bio_tags_from_spans(spans, n)[1]
            sums.update(gold_spans=gold, bio_unrepresentable=gold - jnp.sum(kept))
        return sums

    def finalize(self, totals: Mapping[str, Sums]) -> Sums:
        total = totals[EVAL]
        metrics = {"loss": ratio(total["loss_sum"], total["rows"]),
                   **ops.f1_from_counts(total["tp"], total["fp"], total["fn"])}
        for key in ("gold_spans", "bio_unrepresentable", "dropped_spans"):
            if key in total:
                metrics[key] = total[key]
        return metrics

    def tokens_in(self, batch: Any) -> int:
        return int(np.sum(batch["valid"]))

    def predict(self, model: Any, tokens: jax.Array, valid: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
        """The predicted spans of `tokens [b, n]` (`valid [b, n]`, the model in eval mode).

        Returns `(chosen, scores)`, bool and float32 `[b, types, n, n]`: entry
        `(α, i, j)` is chosen iff span `i … j` (end inclusive) is predicted an entity of
        type `α`. GlobalPointer: chosen iff its logit `s_α(i, j) > 0`, the ZLPR
        decision (kexue.fm/archives/8373), and the score is that logit. BIO tagger:
        chosen iff the arg-max tags decode to the span (`bio_span_scores`), and the
        score is the geometric mean of those tags' probabilities,
        `exp(mean_{k=i..j} log p(tag_k))`, in (0, 1].
        """
        logits = model(tokens, valid=valid)
        if not _is_tagger(model):
            return logits > 0, logits
        chosen = model.span_scores(logits, valid=valid) > 0
        log_probs = jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)  # arg-max tag
        through = jnp.cumsum(log_probs, axis=-1)                             # Σ_{k ≤ j}
        before = through - log_probs                                         # Σ_{k < i}
        n = tokens.shape[1]
        length = jnp.maximum(jnp.arange(n)[None, :] - jnp.arange(n)[:, None] + 1, 1)
        mean = (through[:, None, :] - before[:, :, None]) / length          # [b, i, j]
        scores = jnp.broadcast_to(jnp.exp(mean)[:, None], chosen.shape)
        return chosen, jnp.where(chosen, scores, 0.0)


def scored_spans(chosen: Any, scores: Any) -> list[list[tuple[int, int, int, float]]]:
    """Per sentence, the rows `(type, start, end, score)` where `chosen [b, types, n, n]`
    is True (from `NERTask.predict`), sorted by `(start, end, type)`; runs on the host."""
    chosen = np.asarray(jax.device_get(chosen), bool)
    scores = np.asarray(jax.device_get(scores), np.float32)
    rows: list[list[tuple[int, int, int, float]]] = [[] for _ in range(chosen.shape[0])]
    for b, kind, start, end in np.argwhere(chosen):
        rows[b].append((int(kind), int(start), int(end), float(scores[b, kind, start, end])))
    return [sorted(spans, key=lambda row: (row[1], row[2], row[0])) for spans in rows]
