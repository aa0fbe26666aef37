"""One device versus a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices; sharded init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kexue import models
from kexue.parallel import init_sharded, make_mesh, nnx_state_shardings, shard_batch
from tests.models._configs import forward, model_config


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, tensor=2)


def mlm_batch(rng, b=8, n=12):
    tokens = rng.integers(0, 64, (b, n))
    valid = np.arange(n)[None, :] < rng.integers(n // 2, n + 1, (b, 1))
    weights = (rng.random((b, n)) < 0.3) & valid
    return {"tokens": tokens, "valid": valid, "labels": rng.integers(0, 64, (b, n)),
            "weights": weights.astype(np.float32)}


def gp_batch(rng, b=8, n=10):
    batch = mlm_batch(rng, b, n)
    spans = np.full((b, 3, 3), -1)
    for i in range(b):
        length = int(batch["valid"][i].sum())
        start = rng.integers(0, length)
        spans[i, 0] = (rng.integers(0, 3), start, rng.integers(start, length))
    return {"tokens": batch["tokens"], "valid": batch["valid"], "spans": spans}


def loss_of(name):
    if name == "global_pointer_ner":
        def loss(model, batch):
            logits = model(batch["tokens"], valid=batch["valid"])
            return model.loss(logits, batch["spans"], valid=batch["valid"])
    else:
        def loss(model, batch):
            logits = model(batch["tokens"], valid=batch["valid"])
            return models.cross_entropy(logits, batch["labels"], batch["weights"])
    return loss


@pytest.mark.parametrize(
    ("name", "overrides", "make_batch"),
    [
        ("roformer_mlm", {"num_kv_heads": 2, "activation": "geglu",
                          "attention_scale": "entropy_invariant"}, mlm_batch),
        ("global_pointer_ner", {"gp_loss": "sparse", "efficient": True, "norm": "rmsnorm"},
         gp_batch),
    ],
)
def test_same_loss_and_grads_on_one_and_eight_devices(rng, mesh, name, overrides, make_batch):
    config = model_config(name, num_layers=2, **overrides)
    model = models.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = jax.tree.map(jnp.asarray, make_batch(rng))
    loss = loss_of(name)

    def value_and_grad(params, rest, batch):
        return jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, rest), batch))(params)

    one_loss, one_grads = jax.jit(value_and_grad)(params, rest, batch)

    param_shardings = nnx_state_shardings(params, mesh)
    sharded_params = jax.device_put(params, param_shardings)
    sharded_rest = jax.device_put(rest, nnx_state_shardings(rest, mesh))
    sharded_batch = shard_batch(batch, mesh)
    assert sharded_batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    with jax.set_mesh(mesh):  # activations get their logical constraints too
        step = jax.jit(value_and_grad,
                       out_shardings=(NamedSharding(mesh, P()), param_shardings))
        many_loss, many_grads = step(sharded_params, sharded_rest, sharded_batch)
    kernel = many_grads["encoder"]["transformer"]["blocks"][0]["ffn"]["wi"]["kernel"]
    assert kernel.get_value().sharding.is_equivalent_to(
        NamedSharding(mesh, P("fsdp", "tensor")), 2)
    np.testing.assert_allclose(float(many_loss), float(one_loss), rtol=1e-5, atol=1e-5)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(one_grads),
                                 jax.tree.leaves(many_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_init_sharded_creates_each_shard_in_place(mesh):
    config = model_config("causal_lm", num_kv_heads=2)
    model = init_sharded(lambda: models.build_model(config, rngs=nnx.Rngs(7)), mesh)
    embedding = model.embed.embedding.get_value()
    assert embedding.sharding.is_equivalent_to(NamedSharding(mesh, P("tensor", "fsdp")), 2)
    # Each device holds a quarter of the table (vocab over tensor, width over fsdp).
    assert {shard.data.shape for shard in embedding.addressable_shards} == {(32, 16)}
    query = model.transformer.blocks[0].attention.query.kernel.get_value()
    assert query.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor", None)), 3)
    # Same values as a plain single-device build with the same seed.
    plain = models.build_model(config, rngs=nnx.Rngs(7))
    for want, got in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)),
                         jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    tokens = jnp.asarray(np.arange(16).reshape(8, 2) % 64)
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, t: m(t))(model, shard_batch(tokens, mesh))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(plain, tokens)), atol=1e-5)
