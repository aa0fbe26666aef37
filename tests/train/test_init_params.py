"""`create_train_state(init_params=)` / `train_loop(init_params=)`: parameters set after
the init land on the state's shardings, the optimizer state follows them, and a
resumed run never calls the hook."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import pytest

from kexue.parallel import make_mesh
from kexue.train import abstract_train_state, create_train_state
from tests.train import toy


def _mesh():
    return make_mesh(2, 2, 2, devices=jax.devices()[:8])


class _Copy(NamedTuple):
    params: Any


def copying_tx() -> optax.GradientTransformation:
    """Plain SGD whose state is a copy of the parameters it was initialised with."""
    sgd = optax.sgd(1e-2)

    def init(params):
        return _Copy(jax.tree.map(lambda p: p + 0, params))

    def update(updates, state, params=None):
        del params
        return sgd.update(updates, sgd.init(updates))[0], state

    return optax.GradientTransformation(init, update)


def test_given_parameters_are_placed_and_the_optimizer_state_follows_them(rng):
    mesh, tx = _mesh(), copying_tx()
    plain = create_train_state(toy.model_factory(), tx, mesh)
    w1 = rng.normal(size=(toy.IN_DIM, toy.HIDDEN))  # float64 on the host
    b2 = rng.normal(size=(toy.OUT_DIM,))

    def init_params(model):
        model.w1.set_value(w1)
        model.b2.set_value(jax.numpy.asarray(b2, jax.numpy.float32))

    state = create_train_state(toy.model_factory(), tx, mesh, init_params=init_params)
    abstract = abstract_train_state(toy.model_factory(), tx, mesh)
    np.testing.assert_array_equal(np.asarray(state.params["w1"]), w1.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(state.params["b2"]), b2.astype(np.float32))
    for name in ("b1", "w2"):  # untouched parameters keep the factory's init
        np.testing.assert_array_equal(np.asarray(state.params[name]),
                                      np.asarray(plain.params[name]))
    for name in ("w1", "b1", "w2", "b2"):
        assert state.params[name].dtype == np.float32
        assert state.params[name].sharding == abstract.params[name].sharding, name
        np.testing.assert_array_equal(np.asarray(state.opt_state.params[name]),
                                      np.asarray(state.params[name]))
    assert int(state.step) == 0
    assert jax.tree.structure(state) == jax.tree.structure(plain)


def test_a_hook_that_changes_a_shape_is_named():
    def init_params(model):
        model.w2.set_value(np.zeros((toy.HIDDEN, toy.OUT_DIM + 1), np.float32))

    with pytest.raises(ValueError, match=r"`init_params`.*w2: expected \[16, 2\], got \[16, 3\]"):
        create_train_state(toy.model_factory(), optax.sgd(0.1), _mesh(),
                           init_params=init_params)


def test_train_loop_calls_the_hook_only_when_starting_from_scratch(tmp_path, rng):
    from kexue.train import LoopConfig, train_loop

    w1 = rng.normal(size=(toy.IN_DIM, toy.HIDDEN)).astype(np.float32)
    calls = []

    def init_params(model):
        calls.append(np.asarray(model.w1.get_value()))
        model.w1.set_value(w1)

    def run(num_steps: int):
        return train_loop(model_factory=toy.model_factory(), loss_fn=toy.loss_fn,
                          tx=optax.sgd(0.0), train_data=toy.RegressionBatches(8),
                          mesh=_mesh(), workdir=tmp_path, init_params=init_params,
                          config=LoopConfig(num_steps=num_steps, checkpoint_every=2,
                                            async_checkpointing=False, tensorboard=False),
                          log=lambda message: None)

    first = run(2)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(first.state.params["w1"]), w1)  # lr 0
    second = run(4)
    assert len(calls) == 1, "a resumed run called init_params"
    assert second.step == 4
