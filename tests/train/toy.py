"""A tiny NNX regression model and a checkpointable NumPy batch iterator for the trainer tests."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

IN_DIM, HIDDEN, OUT_DIM = 4, 16, 2


def make_param(rngs: nnx.Rngs, init: Any, shape: tuple[int, ...], axes: tuple[str, ...]):
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes)


class MLP(nnx.Module):
    """`y = tanh(x W1 + b1) W2 + b2`, with logical axes on every weight."""

    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = make_param(rngs, init, (IN_DIM, HIDDEN), ("embed", "mlp"))
        self.b1 = make_param(rngs, nnx.initializers.zeros, (HIDDEN,), ("mlp",))
        self.w2 = make_param(rngs, init, (HIDDEN, OUT_DIM), ("mlp", "embed"))
        self.b2 = make_param(rngs, nnx.initializers.zeros, (OUT_DIM,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ self.w1[...] + self.b1[...]) @ self.w2[...] + self.b2[...]


class WiderMLP(MLP):
    """The same parameter names with another hidden width, plus one extra parameter."""

    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = make_param(rngs, init, (IN_DIM, 2 * HIDDEN), ("embed", "mlp"))
        self.b1 = make_param(rngs, nnx.initializers.zeros, (2 * HIDDEN,), ("mlp",))
        self.w2 = make_param(rngs, init, (2 * HIDDEN, OUT_DIM), ("mlp", "embed"))
        self.b2 = make_param(rngs, nnx.initializers.zeros, (OUT_DIM,), ("embed",))
        self.gain = make_param(rngs, nnx.initializers.ones, (OUT_DIM,), ("embed",))


def model_factory(seed: int = 0, cls: type = MLP):
    return lambda: cls(rngs=nnx.Rngs(seed))


def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array, *,
            noise_scale: float = 1e-3):
    """Mean squared error against targets jittered by the step's key (so it is exercised)."""
    noise = noise_scale * jax.random.normal(rng, batch["y"].shape)
    error = model(batch["x"]) - batch["y"] - noise
    loss = jnp.mean(error ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(error))}


def tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2, weight_decay=1e-4)


class RegressionBatches:
    """Deterministic batches of a fixed random regression task; state = next index.

    `poison` lists batch indices whose inputs are NaN (a non-finite batch).
    """

    def __init__(self, batch_size: int = 8, *, seed: int = 0, poison: tuple[int, ...] = ()):
        self.batch_size, self.seed, self.poison = batch_size, seed, tuple(poison)
        teacher = np.random.default_rng(1234)
        self.w = teacher.normal(size=(IN_DIM, OUT_DIM)).astype(np.float32)
        self.index = 0

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        x = rng.normal(size=(self.batch_size, IN_DIM)).astype(np.float32)
        y = np.tanh(0.5 * x @ self.w).astype(np.float32)
        if self.index in self.poison:
            x = np.full_like(x, np.nan)
        self.index += 1
        return {"x": x, "y": y}


def eval_batches() -> list[dict[str, np.ndarray]]:
    data = RegressionBatches(16, seed=99)
    return [next(data), next(data)]


def run(workdir: str, mesh: Any, num_steps: int, *, poison: tuple[int, ...] = (),
        **config: Any):
    """`train_loop` on the regression task; extra keywords are `LoopConfig` fields."""
    from kexue.train import LoopConfig, train_loop

    settings = {"log_every": 1, "eval_every": 0, "checkpoint_every": 2, **config}
    return train_loop(model_factory=model_factory(), loss_fn=loss_fn, tx=tx(),
                      train_data=RegressionBatches(8, poison=poison), mesh=mesh,
                      config=LoopConfig(num_steps=num_steps, **settings), workdir=workdir,
                      eval_data=eval_batches, log=lambda message: print(message, flush=True))
