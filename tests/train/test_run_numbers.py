"""The numbers a run logs: throughput over training time only, the learning rate, the
relative update `‖Δθ‖ / ‖θ‖`."""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from kexue.parallel import make_mesh
from kexue.train import (
    LoopConfig,
    abstract_train_state,
    create_train_state,
    make_train_step,
    train_loop,
)
from tests.train import toy

PAUSE = 0.6  # seconds added to the compilation and to every evaluation


def test_relative_update_is_the_update_norm_over_the_parameter_norm():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = toy.tx()
    state = create_train_state(toy.model_factory(), tx, mesh)
    step = make_train_step(toy.loss_fn, tx, abstract_train_state(toy.model_factory(), tx, mesh),
                           mesh, donate=False)
    batch = next(toy.RegressionBatches(8))
    before = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(state.params)]
    new, metrics = step(state, batch)
    after = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(new.params)]
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before, strict=True)))
    size = np.sqrt(sum(np.sum(b ** 2) for b in before))
    np.testing.assert_allclose(float(metrics["relative_update"]), moved / size, rtol=1e-4)


def test_throughput_leaves_out_compilation_and_evaluation(tmp_path):
    def slow_to_trace_loss(model, batch, rng):
        time.sleep(PAUSE)  # Python runs while tracing only: this is compilation time
        return toy.loss_fn(model, batch, rng)

    def slow_eval():
        time.sleep(PAUSE)
        return toy.eval_batches()

    messages = []
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    train_loop(model_factory=toy.model_factory(), loss_fn=slow_to_trace_loss, tx=toy.tx(),
               train_data=toy.RegressionBatches(8), mesh=mesh,
               config=LoopConfig(num_steps=4, log_every=1, eval_every=1, checkpoint_every=1,
                                 tensorboard=False), workdir=str(tmp_path),
               eval_data=slow_eval, log=messages.append,
               learning_rate=lambda count: 0.01 * (count + 1))
    records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").open())
               if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        # Every interval holds a compilation or an evaluation of PAUSE seconds; none counts.
        assert 1 / record["steps_per_s"] < PAUSE / 2, record
        np.testing.assert_allclose(record["tokens_per_s"], 8 * record["steps_per_s"])
        np.testing.assert_allclose(record["learning_rate"], 0.01 * record["step"])
        assert record["relative_update"] > 0
    assert any(message.startswith("train step compiled in") for message in messages)
