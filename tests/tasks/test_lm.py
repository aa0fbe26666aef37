"""`LMTask`: evaluation at several lengths on the stdlib byte corpus.

A tiny untrained decoder: the per-length and tail losses the task's sums finalize to
must equal a direct float64 computation with the model on the windows the data
pipeline cuts at that length, over the same text.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kexue import models, tasks
from kexue.data import DataConfig, make_dataset
from kexue.parallel import make_mesh
from kexue.train import abstract_train_state, create_train_state, evaluate, make_eval_step

LENGTHS = (8, 16, 32)
EVAL_BATCHES = 2
DATA = DataConfig(name="text_files", task="lm", tokenizer="byte", seq_len=16, batch_size=8,
                  eval_batches=EVAL_BATCHES)


def _spec(vocab_size: int) -> models.ModelSpec:
    return models.ModelSpec.from_settings({
        "name": "causal_lm", "width": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32,
        "vocab_size": vocab_size, "attention_scale": "entropy_invariant"})


def _evaluate(task: tasks.LMTask):
    vocab = make_dataset(DATA, "eval").metadata.vocab_size
    factory = lambda: models.build_model(_spec(vocab), rngs=nnx.Rngs(0))  # noqa: E731
    mesh = make_mesh(devices=jax.devices()[:1])
    tx = optax.sgd(0.1)
    state = create_train_state(factory, tx, mesh)
    step = make_eval_step(task.eval_stats, abstract_train_state(factory, tx, mesh), mesh)
    batches = tasks.eval_batches(task, lambda n: make_dataset(DATA, "eval", seq_len=n))
    return state.model(), evaluate(step, state, batches, mesh, task.finalize)


@pytest.fixture(scope="module")
def evaluated():
    return _evaluate(tasks.LMTask(eval_lengths=LENGTHS))


def _direct(model, length: int, batches: int) -> dict[str, float]:
    """float64 NLL sums over the first `batches` batches of the windows of `length`."""
    import dataclasses

    sums = {"nll": 0.0, "tokens": 0.0, "tail_nll": 0.0, "tail_tokens": 0.0}
    data = dataclasses.replace(DATA, eval_batches=batches)
    for batch in make_dataset(data, "eval", seq_len=length):
        tokens, weights = batch["tokens"], batch["weights"].astype(np.float64)
        logits = np.asarray(model(jnp.asarray(tokens[:, :-1])), np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(-1))
        target = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        nll = (log_z - target) * weights
        tail = np.arange(length) >= 3 * length // 4
        sums["nll"] += nll.sum()
        sums["tokens"] += weights.sum()
        sums["tail_nll"] += nll[:, tail].sum()
        sums["tail_tokens"] += weights[:, tail].sum()
    return sums


@pytest.mark.parametrize("length", LENGTHS)
def test_per_length_losses_equal_a_direct_computation(evaluated, length):
    model, metrics = evaluated
    # The windows of `length` that cover the text of the longest length's windows.
    sums = _direct(model, length, EVAL_BATCHES * max(LENGTHS) // length)
    assert metrics[f"tokens_{length}"] == sums["tokens"] > 0
    assert metrics[f"tokens_tail_{length}"] == sums["tail_tokens"] > 0
    loss, tail = sums["nll"] / sums["tokens"], sums["tail_nll"] / sums["tail_tokens"]
    np.testing.assert_allclose(metrics[f"loss_{length}"], loss, rtol=2e-5)
    np.testing.assert_allclose(metrics[f"loss_tail_{length}"], tail, rtol=2e-5)
    np.testing.assert_allclose(metrics[f"bits_per_byte_{length}"], loss / math.log(2),
                               rtol=2e-5)
    np.testing.assert_allclose(metrics[f"perplexity_{length}"], math.exp(loss), rtol=5e-5)
    np.testing.assert_allclose(metrics[f"perplexity_tail_{length}"], math.exp(tail),
                               rtol=5e-5)


def test_every_length_scores_the_same_targets_and_training_length_metrics_stay(evaluated):
    model, metrics = evaluated
    assert {float(metrics[f"tokens_{n}"]) for n in LENGTHS} == {EVAL_BATCHES * 8 * max(LENGTHS)}
    assert metrics["tokens_tail_8"] == metrics["tokens_8"] / 4  # ⌊3·8/4⌋ = 6: 2 of 8
    # `loss` and `bits_per_byte` are over windows of the training length 16.
    assert metrics["tokens"] == EVAL_BATCHES * 8 * 16
    sums = _direct(model, 16, EVAL_BATCHES)
    assert metrics["tokens"] == sums["tokens"]
    np.testing.assert_allclose(metrics["loss"], sums["nll"] / sums["tokens"], rtol=2e-5)
    np.testing.assert_allclose(metrics["bits_per_byte"],
                               sums["nll"] / sums["tokens"] / math.log(2), rtol=2e-5)


def test_without_lengths_one_stream_and_the_training_length_metrics():
    task = tasks.LMTask()
    assert task.eval_streams() == {tasks.EVAL: None}
    _, metrics = _evaluate(task)
    assert set(metrics) == {"loss", "bits_per_byte", "tokens"}


def test_split_windows_cuts_the_pipelines_windows(rng):
    n, length = 12, 4
    tokens = rng.integers(0, 50, (2, n + 1))
    weights = rng.random((2, n)).astype(np.float32)
    split = tasks.split_windows({"tokens": jnp.asarray(tokens), "weights": jnp.asarray(weights)},
                                length)
    for row in range(2):
        for j in range(n // length):
            np.testing.assert_array_equal(split["tokens"][row * 3 + j],
                                          tokens[row, j * length: j * length + length + 1])
            np.testing.assert_array_equal(split["weights"][row * 3 + j],
                                          weights[row, j * length: (j + 1) * length])


@pytest.mark.parametrize("value", [(0, 16), (16, -8), (16, 16), (8.0, 16), (True,), (24, 16)])
def test_bad_eval_lengths_raise_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"`eval_lengths`"):
        tasks.LMTask(eval_lengths=value)
