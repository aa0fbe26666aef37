"""The `ner` task: the BIO baseline and the R-Drop objective (`_build._ner`), smoke configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy.special import expit

from experiments import _build
from kexue import models
from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER

ROOT = Path(__file__).resolve().parents[2]
needs_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


def smoke_config(path: str, **overrides) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("_ner_config", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config = _build.resolve_config(config, module.PRESETS, {})
    config.update_from_flattened_dict({"data.manual_dir": CLUENER_DIR, **overrides})
    return config


# ------------------------------------------------------------------ config checks


@pytest.mark.parametrize("alpha", [-1.0, "4", True, float("nan"), float("inf")])
def test_bad_rdrop_alpha_is_rejected_naming_the_key(alpha):
    config = smoke_config("configs/cluener_globalpointer.py")
    config.objective.rdrop_alpha = alpha
    with pytest.raises(ValueError, match=r"`objective\.rdrop_alpha`: expected a finite number"):
        _build.check_config(config)


def test_rdrop_needs_a_global_pointer_model():
    config = smoke_config("configs/cluener_bio.py")
    config.objective.rdrop_alpha = 4.0
    with pytest.raises(ValueError, match=r"`objective\.rdrop_alpha`.*global_pointer_ner"):
        _build.check_config(config)
    config.objective.rdrop_alpha = 0.0  # off: allowed for any model
    _build.check_config(config)


def test_rdrop_alpha_is_not_a_key_of_other_tasks():
    config = smoke_config("configs/cluener_multilabel.py")
    config.objective.rdrop_alpha = 1.0
    with pytest.raises(ValueError, match=r"unknown config key `objective\.rdrop_alpha`"):
        _build.check_config(config)


# ------------------------------------------------------------------ R-Drop loss


def numpy_zlpr(logits, labels, exists):
    """Mean over (b, types) of `log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s)` over existing spans."""
    s = np.where(exists, logits, 0.0)
    neg = np.where(exists & (labels == 0), np.exp(s), 0.0).sum((-2, -1))
    pos = np.where(exists & (labels == 1), np.exp(-s), 0.0).sum((-2, -1))
    return np.mean(np.log1p(neg) + np.log1p(pos))


def numpy_gp_kl(a, b, exists):
    sig = expit(a) - expit(b)
    return np.mean(np.where(exists, sig * (a - b), 0.0).sum((-2, -1)))


def test_rdrop_loss_equals_the_formula_on_fixed_logits(rng):
    b, types, n = 3, 2, 6
    model = models.build_model(
        {"model": {"name": "global_pointer_ner", "width": 16, "num_layers": 1, "num_heads": 2,
                   "mlp_dim": 32, "vocab_size": 16, "num_types": types, "gp_head_dim": 4}},
        rngs=nnx.Rngs(0))
    valid = np.arange(n)[None, :] < np.array([[6], [4], [2]])
    exists = (np.triu(np.ones((n, n), bool))[None, None]
              & valid[:, None, :, None] & valid[:, None, None, :])
    a = rng.normal(0, 2, (b, types, n, n))
    c = a + rng.normal(0, 1, (b, types, n, n))
    a, c = np.where(exists, a, -1e12), np.where(exists, c, -1e12)
    labels = (rng.random((b, types, n, n)) < 0.2) & exists
    rdrop = jax.jit(model.rdrop_loss, static_argnames="alpha")
    for alpha in (0.0, 4.0):
        loss, parts = rdrop(jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32),
                            jnp.asarray(labels, jnp.int32), alpha=alpha,
                            valid=jnp.asarray(valid))
        zlpr = 0.5 * (numpy_zlpr(a, labels, exists) + numpy_zlpr(c, labels, exists))
        divergence = numpy_gp_kl(a, c, exists)
        assert divergence > 0.1
        np.testing.assert_allclose(float(parts["zlpr"]), zlpr, rtol=1e-5)
        np.testing.assert_allclose(float(parts["gp_kl"]), divergence, rtol=1e-5)
        np.testing.assert_allclose(float(loss), zlpr + alpha / 4 * divergence, rtol=1e-5)


@needs_cluener
def test_task_loss_runs_two_dropout_passes_and_adds_the_divergence():
    config = smoke_config("configs/cluener_globalpointer.py",
                          **{"objective.rdrop_alpha": 4.0, "model.dropout_rate": 0.2})
    _build.check_config(config)
    task = _build.build_task(config, mesh=None)
    batch = jax.tree.map(jnp.asarray, next(iter(task.train_data)))
    model = task.model_factory()
    loss, parts = nnx.jit(task.loss_fn)(nnx.clone(model), batch, None)

    @nnx.jit
    def two_passes(model, tokens, valid):
        return model(tokens, valid=valid), model(tokens, valid=valid)

    # The same two passes by hand: a clone of the model (same dropout stream), called twice.
    n = batch["tokens"].shape[1]
    first, second = two_passes(nnx.clone(model), batch["tokens"], batch["valid"])
    assert not np.allclose(first, second)
    y = np.zeros(first.shape)  # dense 0/1 gold labels from the span rows
    for row, spans in enumerate(np.asarray(batch["spans"])):
        for t, i, j in spans[spans[:, 0] >= 0]:
            y[row, t, i, j] = 1
    token = np.asarray(batch["valid"])
    exists = (np.triu(np.ones((n, n), bool))[None, None]
              & token[:, None, :, None] & token[:, None, None, :])
    a, c = (np.asarray(x, np.float64) for x in (first, second))
    divergence = numpy_gp_kl(a, c, exists)
    expected = 0.5 * (numpy_zlpr(a, y, exists) + numpy_zlpr(c, y, exists)) + divergence
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    np.testing.assert_allclose(float(parts["gp_kl"]), divergence, rtol=1e-4)
    # α = 0 would be the one-pass ZLPR loss of the first pass: R-Drop changes the objective.
    assert divergence > 0 and float(loss) != pytest.approx(numpy_zlpr(a, y, exists))


# ------------------------------------------------------------------ BIO task


@needs_cluener
def test_bio_eval_counts_the_spans_bio_cannot_hold():
    config = smoke_config("configs/cluener_bio.py")
    task = _build.build_task(config, mesh=None)
    n, types = 8, int(task.config.model.num_types)
    # Example 0: (0, 1, 4) with (2, 2, 3) nested in it; example 1: one plain span.
    spans = np.array([[(0, 1, 4), (2, 2, 3), (-1, -1, -1)],
                      [(5, 0, 1), (-1, -1, -1), (-1, -1, -1)]], np.int32)
    batch = {"tokens": np.full((2, n), 5, np.int32), "valid": np.ones((2, n), bool),
             "spans": spans, "example_weights": np.ones(2, np.float32)}
    stacked = {"eval": {k: jnp.asarray(v)[:, None] for k, v in batch.items()}}
    model = task.model_factory()
    model.eval()
    _, metrics = task.eval_fn(model, stacked, None)
    assert float(metrics["gold_spans"]) == 3 and float(metrics["bio_unrepresentable"]) == 1
    assert float(metrics["tp"] + metrics["fn"]) == 3  # every gold span is scored
    assert types == 10
