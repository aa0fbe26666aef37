"""Train/eval steps: learning, sharding invariance, gradient accumulation, non-finite guard."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from kexue.parallel import make_mesh
from kexue.train import (
    abstract_train_state,
    create_train_state,
    loss_stats,
    make_eval_step,
    make_train_step,
)
from tests.train import toy


def _mesh(data: int, fsdp: int, tensor: int):
    return make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _train(mesh, steps: int, *, grad_accum_steps: int = 1, poison=(), loss_fn=toy.loss_fn):
    tx = toy.tx()
    abstract = abstract_train_state(toy.model_factory(), tx, mesh)
    state = create_train_state(toy.model_factory(), tx, mesh)
    step = make_train_step(loss_fn, tx, abstract, mesh, grad_accum_steps=grad_accum_steps)
    data = toy.RegressionBatches(8, poison=poison)
    history = []
    for _ in range(steps):
        state, metrics = step(state, next(data))
        history.append(jax.device_get(metrics))
    return state, history


def test_loss_decreases():
    _, history = _train(_mesh(1, 1, 1), 60)
    losses = np.array([metrics["loss"] for metrics in history])
    assert losses[-10:].mean() < 0.5 * losses[:10].mean(), losses


def test_sharded_run_matches_single_device_run():
    mesh = _mesh(2, 2, 2)
    sharded, sharded_history = _train(mesh, 6)
    single, single_history = _train(_mesh(1, 1, 1), 6)
    assert sharded.params["w1"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert sharded.opt_state[0].mu["w2"].sharding.spec == PartitionSpec("tensor", "fsdp")
    np.testing.assert_allclose([m["loss"] for m in sharded_history],
                               [m["loss"] for m in single_history], rtol=1e-5, atol=1e-6)
    for name in ("w1", "b1", "w2", "b2"):
        np.testing.assert_allclose(np.asarray(sharded.params[name]),
                                   np.asarray(single.params[name]), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_whole_batch():
    mesh = _mesh(2, 2, 2)
    noiseless = functools.partial(toy.loss_fn, noise_scale=0.0)  # keys differ per micro-batch
    accumulated, accumulated_history = _train(mesh, 4, grad_accum_steps=4, loss_fn=noiseless)
    whole, whole_history = _train(mesh, 4, loss_fn=noiseless)
    np.testing.assert_allclose([m["loss"] for m in accumulated_history],
                               [m["loss"] for m in whole_history], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(accumulated.params["w1"]),
                               np.asarray(whole.params["w1"]), rtol=1e-5, atol=1e-6)


def test_nonfinite_batch_is_skipped_and_counted():
    mesh = _mesh(1, 1, 1)
    before, _ = _train(mesh, 2)
    after, history = _train(mesh, 3, poison=(2,))
    assert [int(m["nonfinite"]) for m in history] == [0, 0, 1]
    assert int(history[-1]["nonfinite_steps"]) == 1
    assert int(after.step) == 3 and int(after.nonfinite_steps) == 1
    for new, old in zip(jax.tree.leaves((after.params, after.opt_state)),
                        jax.tree.leaves((before.params, before.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    _, resumed = _train(mesh, 4, poison=(2,))
    assert np.isfinite(resumed[-1]["loss"]) and int(resumed[-1]["consecutive_nonfinite"]) == 0


def test_eval_step_reports_loss_without_updating():
    mesh = _mesh(1, 2, 1)
    tx = toy.tx()
    abstract = abstract_train_state(toy.model_factory(), tx, mesh)
    state = create_train_state(toy.model_factory(), tx, mesh)
    batch = toy.eval_batches()[0]
    sums = make_eval_step(loss_stats(toy.loss_fn), abstract, mesh)(state, batch, "eval")
    model = state.model()
    prediction = np.asarray(model(batch["x"]))
    assert float(sums["batches"]) == 1.0
    assert abs(float(sums["mae"]) - np.abs(prediction - batch["y"]).mean()) < 1e-2
    assert int(state.step) == 0


def test_loss_fn_metric_name_clash_is_reported():
    mesh = _mesh(1, 1, 1)
    tx = toy.tx()
    abstract = abstract_train_state(toy.model_factory(), tx, mesh)

    def bad_loss(model, batch, rng):
        loss, _ = toy.loss_fn(model, batch, rng)
        return loss, {"grad_norm": loss}

    step = make_train_step(bad_loss, tx, abstract, mesh, donate=False)
    state = create_train_state(toy.model_factory(), tx, mesh)
    with pytest.raises(ValueError, match="grad_norm"):
        step(state, next(toy.RegressionBatches(8)))
