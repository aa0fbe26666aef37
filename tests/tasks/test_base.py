"""The task protocol's pieces: summing, ratios, streams, and streaming evaluation.

Evaluation adds per-batch sums: the finalized metrics must not depend on how the set
is cut into batches, and the memory it holds must not grow with the number of batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kexue import tasks
from kexue.parallel import make_mesh
from kexue.train import abstract_train_state, create_train_state, evaluate, make_eval_step


def test_add_sums_adds_key_by_key_and_rejects_other_keys():
    total = tasks.add_sums(None, {"a": jnp.float32(1), "b": jnp.float32(2)})
    total = tasks.add_sums(total, {"a": jnp.float32(3), "b": jnp.float32(-1)})
    assert {k: float(v) for k, v in total.items()} == {"a": 4.0, "b": 1.0}
    with pytest.raises(ValueError, match="keys"):
        tasks.add_sums(total, {"a": jnp.float32(1)})


def test_ratio_is_zero_where_the_denominator_is():
    got = tasks.ratio(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([2.0, 0.0, 4.0]))
    np.testing.assert_array_equal(np.asarray(got), [0.5, 0.0, 0.75])
    grad = jax.grad(lambda x: tasks.ratio(x, jnp.float32(0)))(jnp.float32(1))
    assert np.isfinite(grad)


def test_eval_batches_yields_every_stream_in_order():
    task = tasks.MLMTask(eval_lengths=(8, 4))
    seen = list(tasks.eval_batches(task, lambda n: [f"{n}a", f"{n}b"]))
    assert seen == [("length_8", "8a"), ("length_8", "8b"), ("length_4", "4a"),
                    ("length_4", "4b")]


class Scores(nnx.Module):
    """A linear multi-label scorer over summed token embeddings (any batch layout)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (20, 4)))

    def __call__(self, tokens, *, valid):
        return jnp.einsum("bn,bnc->bc", valid.astype(jnp.float32), self.table[...][tokens])


def _evaluate(batches, batch_size):
    task = tasks.MultiLabelTask(num_classes=4)
    mesh = make_mesh(devices=jax.devices()[:1])
    factory = lambda: Scores(rngs=nnx.Rngs(0))  # noqa: E731
    state = create_train_state(factory, optax.sgd(0.1), mesh)
    step = make_eval_step(task.eval_stats, abstract_train_state(factory, optax.sgd(0.1), mesh),
                          mesh)
    cut = [{k: v[i:i + batch_size] for k, v in batches.items()}
           for i in range(0, len(batches["tokens"]), batch_size)]
    return evaluate(step, state, cut, mesh, task.finalize)


def test_metrics_do_not_depend_on_the_batching(rng):
    n = 24
    batches = {"tokens": rng.integers(0, 20, (n, 6)).astype(np.int32),
               "valid": rng.random((n, 6)) < 0.8,
               "type_labels": (rng.random((n, 4)) < 0.4).astype(np.int32),
               "example_weights": np.ones(n, np.float32)}
    whole, pieces = _evaluate(batches, n), _evaluate(batches, 4)
    assert whole.keys() == pieces.keys()
    for name in whole:
        np.testing.assert_allclose(pieces[name], whole[name], rtol=1e-5, err_msg=name)


def test_evaluation_memory_does_not_grow_with_the_number_of_batches(rng):
    """Live device bytes after each batch stay flat: no batch or sum is kept around."""
    task = tasks.MultiLabelTask(num_classes=4)
    mesh = make_mesh(devices=jax.devices()[:1])
    factory = lambda: Scores(rngs=nnx.Rngs(0))  # noqa: E731
    state = create_train_state(factory, optax.sgd(0.1), mesh)
    step = make_eval_step(task.eval_stats, abstract_train_state(factory, optax.sgd(0.1), mesh),
                          mesh)
    live: list[int] = []

    def measured(state, batch, stream):
        sums = step(state, batch, stream)
        jax.block_until_ready(sums)
        live.append(sum(a.nbytes for a in jax.live_arrays()))
        return sums

    def batches(count):
        for _ in range(count):
            yield {"tokens": rng.integers(0, 20, (64, 512)).astype(np.int32),
                   "valid": np.ones((64, 512), bool),
                   "type_labels": (rng.random((64, 4)) < 0.4).astype(np.int32),
                   "example_weights": np.ones(64, np.float32)}

    evaluate(measured, state, batches(4), mesh, task.finalize)
    few = max(live)
    live.clear()
    evaluate(measured, state, batches(64), mesh, task.finalize)
    assert max(live) <= few + 4096, (max(live), few)  # one batch is 160 KiB
