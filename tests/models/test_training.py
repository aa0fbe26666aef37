"""Tiny overfit checks: 30 Adam steps on one fixed batch cut the loss substantially."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kexue import models
from tests.models._configs import model_config


def train(model, loss_fn, batch, steps: int = 30, learning_rate: float = 1e-2) -> list[float]:
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer, batch)) for _ in range(steps)]


def test_mlm_overfits_a_batch(rng):
    model = models.build_model(model_config("roformer_mlm", dropout_rate=0.1),
                               rngs=nnx.Rngs(0))
    tokens = rng.integers(1, 64, (8, 16))
    masked = rng.random((8, 16)) < 0.25
    # Loss on every position (masked ones must be memorised, the rest copied).
    batch = {"inputs": jnp.asarray(np.where(masked, 0, tokens)),  # 0 = [MASK]
             "labels": jnp.asarray(tokens), "weights": jnp.ones((8, 16), jnp.float32)}

    def loss_fn(model, batch):
        logits = model(batch["inputs"])
        return models.cross_entropy(logits, batch["labels"], batch["weights"])

    losses = train(model, loss_fn, batch)
    assert losses[0] > 3.5  # ≈ log 64 at init
    assert losses[-1] < 0.3 * losses[0], losses


def test_global_pointer_ner_overfits_a_batch(rng):
    model = models.build_model(model_config("global_pointer_ner", gp_loss="sparse"),
                               rngs=nnx.Rngs(0))
    b, n = 8, 12
    lengths = rng.integers(6, n + 1, b)
    valid = np.arange(n)[None, :] < lengths[:, None]
    spans = np.full((b, 2, 3), -1)
    for i, length in enumerate(lengths):
        for s in range(2):
            start = rng.integers(0, length)
            spans[i, s] = (rng.integers(0, 3), start, min(start + rng.integers(0, 3), length - 1))
    batch = {"tokens": jnp.asarray(rng.integers(0, 64, (b, n))), "valid": jnp.asarray(valid),
             "spans": jnp.asarray(spans)}

    def loss_fn(model, batch):
        logits = model(batch["tokens"], valid=batch["valid"])
        return model.loss(logits, batch["spans"], valid=batch["valid"])

    losses = train(model, loss_fn, batch)
    assert losses[-1] < 0.3 * losses[0], losses
    model.eval()
    logits = model(batch["tokens"], valid=batch["valid"])
    spans, _, count = models.GlobalPointerNER.decode(logits, max_spans=16)
    predicted = {(i, *row) for i in range(b) for row in np.asarray(spans[i, :count[i]]).tolist()}
    gold = {(i, *map(int, row)) for i in range(b) for row in spans[i] if row[0] >= 0}
    assert len(predicted & gold) >= 0.8 * len(gold)
