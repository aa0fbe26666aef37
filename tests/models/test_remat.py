"""`model.remat`: rematerialised blocks give the same loss and gradients, use less memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models
from kexue.models.layers import REMAT_CPU_COMPILER_OPTIONS, REMAT_POLICIES
from tests.models._configs import model_config

POLICIES = [p for p in REMAT_POLICIES if p != "none"]


def loss_and_grads(name: str, remat: str, tokens: jax.Array, labels: jax.Array):
    """Loss and gradients of a 2-layer model with dropout active, twice in a row.

    The model's RNG stream advances between the two calls, so the second call checks
    that remat draws the same dropout masks as the plain model at every step.
    """
    config = model_config(name, num_layers=2, dropout_rate=0.2, remat=remat)
    model = models.build_model(config, rngs=nnx.Rngs(0))
    model.train()

    @nnx.jit
    def step(model):
        def loss_fn(model):
            return models.cross_entropy(model(tokens), labels)
        return nnx.value_and_grad(loss_fn)(model)

    first = step(model)
    second = step(model)
    return first, second


@pytest.mark.parametrize("name", ["causal_lm", "roformer_mlm"])
def test_remat_matches_plain_model_with_dropout(name, rng):
    tokens = jnp.asarray(rng.integers(0, 64, (3, 12)))
    labels = jnp.asarray(rng.integers(0, 64, (3, 12)))
    reference = loss_and_grads(name, "none", tokens, labels)
    # Dropout is really active: the two steps draw different masks.
    assert abs(float(reference[0][0]) - float(reference[1][0])) > 1e-4
    for policy in POLICIES:
        got = loss_and_grads(name, policy, tokens, labels)
        for (loss, grads), (ref_loss, ref_grads) in zip(got, reference, strict=True):
            np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6, err_msg=policy)
            flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
            assert len(flat) == len(ref_flat)
            for g, ref_g in zip(flat, ref_flat, strict=True):
                np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-6, err_msg=policy)


def test_remat_leaves_decoding_alone(rng):
    """With a KV cache the blocks run plainly; cached logits still equal full logits."""
    config = model_config("causal_lm", num_layers=2, remat="full")
    model = models.build_model(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 6)))
    full = model(tokens)
    cache = model.init_cache(2, 6)
    prefix, cache = model.decode(tokens[:, :4], cache)
    last, _ = model.decode(tokens[:, 4:], cache)
    np.testing.assert_allclose(jnp.concatenate([prefix, last], axis=1), full, atol=1e-5)


@pytest.mark.parametrize("value", ["all", "checkpoint", None, ""])
def test_bad_remat_names_the_setting(value):
    with pytest.raises(ValueError, match=r"`remat`: expected one of"):
        models.build_model(model_config("causal_lm", remat=value), rngs=nnx.Rngs(0))


def compiled_temp_bytes(remat: str) -> int:
    """Temporary buffer bytes of the compiled gradient of a long, narrow causal LM with
    dense attention (whose `[b, h, n, n]` probabilities remat has to drop)."""
    config = model_config("causal_lm", width=64, num_layers=4, num_heads=2, mlp_dim=256,
                          vocab_size=32, remat=remat, attention_implementation="xla")
    model = models.build_model(config, rngs=nnx.Rngs(0))
    # Pure states through a plain `jax.grad`, as in `kexue.train.make_train_step`.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tokens = jnp.zeros((2, 256), jnp.int32)

    def loss(params, rest, tokens):
        return models.cross_entropy(nnx.merge(graphdef, params, rest)(tokens), tokens)

    options = REMAT_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(
        params, rest, tokens).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_full_remat_uses_less_compiled_memory():
    """Activations (attention probabilities `[b, h, n, n]` per layer) dominate here.

    On CPU the gradient is compiled with `REMAT_CPU_COMPILER_OPTIONS` (without them
    XLA:CPU schedules the recomputation early and both sizes are equal).
    """
    none, full = compiled_temp_bytes("none"), compiled_temp_bytes("full")
    assert full < 0.7 * none, (full, none)


def train_step_temp_bytes(remat: str) -> int:
    """Temporary bytes of `kexue.train.make_train_step`'s compiled step (what training uses)."""
    import optax

    from kexue import parallel, train

    config = model_config("causal_lm", width=64, num_layers=4, num_heads=2, mlp_dim=256,
                          vocab_size=32, remat=remat, attention_implementation="xla")
    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])

    def loss_fn(model, batch, rng):
        del rng
        return models.cross_entropy(model(batch), batch), {}

    state = train.abstract_train_state(lambda: models.build_model(config, rngs=nnx.Rngs(0)),
                                       optax.sgd(0.1), mesh)
    step = train.make_train_step(
        loss_fn, optax.sgd(0.1), state, mesh,
        compiler_options=train.cpu_compiler_options(mesh, remat=remat != "none"))
    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    return int(step.lower(state, tokens).compile().memory_analysis().temp_size_in_bytes)


def test_train_step_with_the_cpu_remat_options_saves_memory():
    """`make_train_step` with `cpu_compiler_options(mesh, remat=True)`: remat saves memory."""
    none, full = train_step_temp_bytes("none"), train_step_temp_bytes("full")
    assert full < 0.7 * none, (full, none)


def test_remat_model_evaluates_when_merged_inside_scan_and_eval_shape(rng):
    """A remat model in eval mode merged inside `eval_shape` and `lax.scan` (as in a
    scanned evaluation of one's own) runs (remat is skipped: no gradient is taken) and
    gives the plain model's numbers."""
    tokens = jnp.asarray(rng.integers(0, 64, (3, 2, 16)), jnp.int32)
    totals = []
    for remat in ("none", "full"):
        model = models.build_model(model_config("causal_lm", num_layers=2, remat=remat,
                                                dropout_rate=0.1), rngs=nnx.Rngs(0))
        model.eval()
        graphdef, state = nnx.split(model)

        @jax.jit
        def total(state, tokens, graphdef=graphdef):
            jax.eval_shape(lambda: nnx.merge(graphdef, state)(tokens[0]))

            def body(carry, chunk):
                return carry + jnp.sum(nnx.merge(graphdef, state)(chunk)), None

            return jax.lax.scan(body, jnp.zeros((), jnp.float32), tokens)[0]

        totals.append(total(state, tokens))
    np.testing.assert_allclose(totals[0], totals[1], rtol=1e-5)


def test_remat_train_step_with_gradient_accumulation_matches_plain(rng):
    """`make_train_step(grad_accum_steps=2)` runs the model inside `lax.scan`."""
    import optax

    from kexue import parallel, train

    tokens = jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32)
    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])

    def loss_fn(model, batch, rng):
        del rng
        return models.cross_entropy(model(batch), batch), {}

    losses = []
    for remat in ("none", "full"):
        config = model_config("causal_lm", num_layers=2, remat=remat, dropout_rate=0.1)

        def factory(config=config):
            return models.build_model(config, rngs=nnx.Rngs(0))

        tx = optax.sgd(0.1)
        state = train.create_train_state(factory, tx, mesh)
        step = train.make_train_step(loss_fn, tx, train.abstract_train_state(factory, tx, mesh),
                                     mesh, grad_accum_steps=2)
        for _ in range(2):
            state, metrics = step(state, tokens)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
