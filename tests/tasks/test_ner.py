"""`NERTask`: the R-Drop objective and the BIO baseline's evaluation sums.

The R-Drop loss against a float64 NumPy reference of its formula, on fixed logits and
through the task on a real CLUENER batch (two dropout passes); the BIO tagger's
evaluation counts the gold spans its tags cannot hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import expit

from kexue import models, ops, tasks
from kexue.data import DataConfig, make_dataset
from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER

needs_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)
NUM_TYPES = 10  # CLUENER 2020


def tiny_spec(name: str, **settings) -> models.ModelSpec:
    return models.ModelSpec.from_settings({
        "name": name, "width": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32,
        "vocab_size": 16, "num_types": NUM_TYPES, **settings})


def cluener_batch(seq_len: int = 32) -> dict[str, jax.Array]:
    data = DataConfig(name="cluener", task="ner", tokenizer="char", manual_dir=CLUENER_DIR,
                      seq_len=seq_len, batch_size=8, max_examples=32, shuffle=False)
    batches = make_dataset(data, "train", process_index=0, process_count=1)
    return batches.metadata.vocab_size, jax.tree.map(jnp.asarray, next(batches))


# ------------------------------------------------------------------ R-Drop loss


def numpy_zlpr(logits, labels, valid):
    """Mean over (b, types) of `log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s)` over valid spans."""
    s = np.where(valid, logits, 0.0)
    neg = np.where(valid & (labels == 0), np.exp(s), 0.0).sum((-2, -1))
    pos = np.where(valid & (labels == 1), np.exp(-s), 0.0).sum((-2, -1))
    return np.mean(np.log1p(neg) + np.log1p(pos))


def numpy_gp_kl(a, b, valid):
    sig = expit(a) - expit(b)
    return np.mean(np.where(valid, sig * (a - b), 0.0).sum((-2, -1)))


def test_rdrop_loss_equals_the_formula_on_fixed_logits(rng):
    b, types, n = 3, 2, 6
    model = models.build_model(tiny_spec("global_pointer_ner", num_types=types, gp_head_dim=4),
                               rngs=nnx.Rngs(0))
    tokens = np.arange(n)[None, :] < np.array([[6], [4], [2]])
    valid = (np.triu(np.ones((n, n), bool))[None, None]
             & tokens[:, None, :, None] & tokens[:, None, None, :])
    a = rng.normal(0, 2, (b, types, n, n))
    c = a + rng.normal(0, 1, (b, types, n, n))
    a, c = np.where(valid, a, -1e12), np.where(valid, c, -1e12)
    labels = (rng.random((b, types, n, n)) < 0.2) & valid
    rdrop = jax.jit(model.rdrop_loss, static_argnames="alpha")
    for alpha in (0.0, 4.0):
        loss, parts = rdrop(jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32),
                            jnp.asarray(labels, jnp.int32), alpha=alpha,
                            valid=jnp.asarray(tokens))
        base = 0.5 * (numpy_zlpr(a, labels, valid) + numpy_zlpr(c, labels, valid))
        divergence = numpy_gp_kl(a, c, valid)
        assert divergence > 0.1
        np.testing.assert_allclose(float(parts["zlpr"]), base, rtol=1e-5)
        np.testing.assert_allclose(float(parts["gp_kl"]), divergence, rtol=1e-5)
        np.testing.assert_allclose(float(loss), base + alpha / 4 * divergence, rtol=1e-5)


@needs_cluener
def test_task_loss_runs_two_dropout_passes_and_adds_the_divergence():
    vocab, batch = cluener_batch()
    task = tasks.NERTask(num_types=NUM_TYPES, rdrop_alpha=4.0)
    model = models.build_model(tiny_spec("global_pointer_ner", vocab_size=vocab,
                                         gp_head_dim=8, dropout_rate=0.2), rngs=nnx.Rngs(0))
    loss, parts = nnx.jit(task.loss)(nnx.clone(model), batch, None)

    @nnx.jit
    def two_passes(model, tokens, valid):
        return model(tokens, valid=valid), model(tokens, valid=valid)

    # The same two passes by hand: a clone of the model (same dropout stream), called twice.
    n = batch["tokens"].shape[1]
    first, second = two_passes(nnx.clone(model), batch["tokens"], batch["valid"])
    assert not np.allclose(first, second)
    labels = np.zeros((batch["spans"].shape[0], NUM_TYPES, n, n))
    for row, spans in enumerate(np.asarray(batch["spans"])):
        for kind, start, end in spans[spans[:, 0] >= 0]:
            labels[row, kind, start, end] = 1
    tokens = np.asarray(batch["valid"])
    valid = (np.triu(np.ones((n, n), bool))[None, None]
             & tokens[:, None, :, None] & tokens[:, None, None, :])
    a, c, y = (np.asarray(x, np.float64) for x in (first, second, labels))
    divergence = numpy_gp_kl(a, c, valid)
    expected = 0.5 * (numpy_zlpr(a, y, valid) + numpy_zlpr(c, y, valid)) + divergence
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    np.testing.assert_allclose(float(parts["gp_kl"]), divergence, rtol=1e-4)
    # α = 0 would be the one-pass ZLPR loss of the first pass: R-Drop changes the objective.
    assert divergence > 0 and float(loss) != pytest.approx(numpy_zlpr(a, y, valid))


# ------------------------------------------------------------------ BIO task


def test_bio_eval_counts_the_spans_bio_cannot_hold():
    task = tasks.NERTask(num_types=NUM_TYPES)
    n = 8
    # Example 0: (0, 1, 4) with (2, 2, 3) nested in it; example 1: one plain span.
    spans = np.array([[[0, 1, 4], [2, 2, 3], [-1, -1, -1]],
                      [[5, 0, 1], [-1, -1, -1], [-1, -1, -1]]], np.int32)
    batch = {"tokens": np.full((2, n), 5, np.int32), "valid": np.ones((2, n), bool),
             "spans": spans, "example_weights": np.ones(2, np.float32)}
    model = models.build_model(tiny_spec("bio_tagger"), rngs=nnx.Rngs(0))
    model.eval()
    sums = task.eval_stats(model, jax.tree.map(jnp.asarray, batch))
    metrics = task.finalize({tasks.EVAL: sums})
    assert float(metrics["gold_spans"]) == 3 and float(metrics["bio_unrepresentable"]) == 1
    assert float(metrics["tp"] + metrics["fn"]) == 3  # every gold span is scored


def test_dropped_spans_are_reported_and_count_as_misses(rng):
    task = tasks.NERTask(num_types=NUM_TYPES)
    n, b = 8, 3
    spans = np.full((b, 2, 3), -1, np.int32)
    spans[0, 0] = [1, 2, 4]
    dropped = rng.integers(0, 4, b).astype(np.int32)
    batch = {"tokens": np.full((b, n), 5, np.int32), "valid": np.ones((b, n), bool),
             "spans": spans, "example_weights": np.ones(b, np.float32),
             "dropped_spans": dropped}
    model = models.build_model(tiny_spec("global_pointer_ner"), rngs=nnx.Rngs(0))
    model.eval()
    with_dropped = task.eval_stats(model, jax.tree.map(jnp.asarray, batch))
    del batch["dropped_spans"]
    without = task.eval_stats(model, jax.tree.map(jnp.asarray, batch))
    assert int(with_dropped["dropped_spans"]) == int(dropped.sum())
    assert float(with_dropped["fn"]) == float(without["fn"]) + dropped.sum()
    assert float(with_dropped["tp"]) == float(without["tp"])
    assert float(with_dropped["fp"]) == float(without["fp"])
    assert "dropped_spans" not in without
    metrics = task.finalize({tasks.EVAL: with_dropped})
    assert float(metrics["tp"] + metrics["fn"]) == 1 + dropped.sum()  # every gold span
    assert int(metrics["dropped_spans"]) == int(dropped.sum())
    batch["dropped_spans"] = dropped
    _, aux = task.loss(model, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    assert int(aux["dropped_spans"]) == int(dropped.sum())


def test_spans_at_cls_and_sep_are_neither_trained_nor_counted():
    """WordPiece batches: `[CLS]` / `[SEP]` (offsets covering no text) take no part in
    the span loss or the counts, while every real piece does."""
    task = tasks.NERTask(num_types=NUM_TYPES)
    n = 6  # [CLS] a b c [SEP] <pad>
    offsets = np.array([[[0, 0], [0, 1], [1, 2], [2, 3], [0, 0], [0, 0]]], np.int32)
    valid = np.arange(n)[None, :] < 5
    batch = {"tokens": np.full((1, n), 5, np.int32), "valid": valid, "offsets": offsets,
             "spans": np.array([[[0, 1, 2]]], np.int32), "example_weights": np.ones(1)}
    candidates = np.asarray(tasks.span_valid(jax.tree.map(jnp.asarray, batch)))
    np.testing.assert_array_equal(candidates, [[False, True, True, True, False, False]])
    model = models.build_model(tiny_spec("global_pointer_ner", num_types=NUM_TYPES,
                                         gp_head_dim=4), rngs=nnx.Rngs(0))
    model.eval()
    sums = task.eval_stats(model, jax.tree.map(jnp.asarray, batch))
    # 3 candidate tokens give 6 spans (i ≤ j) per type; one gold span.
    assert float(sums["tp"] + sums["fp"] + sums["fn"]) <= NUM_TYPES * 6 + 1
    logits = np.asarray(model(jnp.asarray(batch["tokens"]), valid=jnp.asarray(valid)))
    # Make every span score positive: only the candidate spans may be counted.
    shifted = jnp.asarray(np.abs(logits) + 1.0)
    counts = ops.span_f1(shifted, ops.spans_to_dense(jnp.asarray(batch["spans"]),
                                                     NUM_TYPES, n),
                         valid=jnp.asarray(candidates))
    assert float(counts["tp"] + counts["fp"]) == NUM_TYPES * 6
    # ... nor trained: the loss does not depend on a span starting or ending at them.
    grad = jax.grad(lambda s: model.loss(s, jnp.asarray(batch["spans"]),
                                         valid=jnp.asarray(candidates)))(shifted)
    grad = np.asarray(grad)
    assert np.all(grad[:, :, [0, 4], :] == 0) and np.all(grad[:, :, :, [0, 4]] == 0)
    assert np.any(grad[:, :, 1:4, 1:4] != 0)


# ------------------------------------------------------------------ prediction


def bio_span_reference(tags: np.ndarray, num_types: int) -> set[tuple[int, int, int, int]]:
    """float-free reference of BIO decoding: `(row, type, start, end)` per decoded span."""
    spans = set()
    for row, sequence in enumerate(tags):
        n = len(sequence)
        for start, tag in enumerate(sequence):
            if tag % 2 == 1:  # B-α is 1 + 2α
                kind, end = (tag - 1) // 2, start
                while end + 1 < n and sequence[end + 1] == 2 + 2 * kind:
                    end += 1
                spans.add((row, kind, start, end))
    return spans


def test_tagger_predictions_are_its_bio_spans_with_the_geometric_mean_tag_probability(rng):
    model = models.build_model(tiny_spec("bio_tagger"), rngs=nnx.Rngs(int(rng.integers(99))))
    model.eval()
    tokens = jnp.asarray(rng.integers(5, 16, (3, 12)))
    valid = jnp.ones((3, 12), bool)
    chosen, scores = tasks.NERTask(num_types=NUM_TYPES).predict(model, tokens, valid)
    logits = np.asarray(model(tokens, valid=valid), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tags = log_probs.argmax(-1)
    expected = bio_span_reference(tags, NUM_TYPES)
    assert {tuple(map(int, row)) for row in np.argwhere(np.asarray(chosen))} == expected
    for row, kind, start, end in expected:
        mean = log_probs[row, np.arange(start, end + 1), tags[row, start:end + 1]].mean()
        np.testing.assert_allclose(float(scores[row, kind, start, end]), np.exp(mean), rtol=1e-5)


def test_global_pointer_predictions_are_the_positive_logits_listed_by_position(rng):
    model = models.build_model(tiny_spec("global_pointer_ner", gp_head_dim=8),
                               rngs=nnx.Rngs(int(rng.integers(99))))
    model.eval()
    tokens = jnp.asarray(rng.integers(5, 16, (2, 10)))
    valid = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [7]]))
    chosen, scores = tasks.NERTask(num_types=NUM_TYPES).predict(model, tokens, valid)
    logits = np.asarray(model(tokens, valid=valid))
    listed = tasks.scored_spans(chosen, scores)
    for row in range(2):
        expected = sorted(((int(t), int(s), int(e), float(logits[row, t, s, e]))
                           for t, s, e in np.argwhere(logits[row] > 0)),
                          key=lambda span: (span[1], span[2], span[0]))
        assert [span[:3] for span in listed[row]] == [span[:3] for span in expected]
        np.testing.assert_allclose([span[3] for span in listed[row]],
                                   [span[3] for span in expected], rtol=1e-6)
        assert all(e < (10 if row == 0 else 7) for _, _, e, _ in listed[row])
