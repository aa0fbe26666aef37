"""Logical-axis rules: specs, clash handling, errors, and real sharded arrays on 8 CPU devices."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kexue.parallel import (
    DEFAULT_RULES,
    logical_sharding,
    logical_to_mesh_spec,
    make_mesh,
    nnx_state_shardings,
    shard_pytree,
    tree_shardings,
    with_logical_constraint,
)

ROOT = Path(__file__).resolve().parents[2]
LOGICAL_NAMES = sorted({name for name, _ in DEFAULT_RULES})


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(2, 2, 2)


def assert_laid_out(array, mesh, spec):
    """`array` is sharded as `spec` says (JAX may drop trailing Nones from the spec)."""
    expected = NamedSharding(mesh, spec)
    assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("logical_axes", "spec"),
    [
        (("embed", "mlp"), P("fsdp", "tensor")),  # FFN in
        (("mlp", "embed"), P("tensor", "fsdp")),  # FFN out
        (("vocab", "embed"), P("tensor", "fsdp")),  # token embedding
        (("embed", "heads", "head_dim"), P("fsdp", "tensor", None)),  # query projection
        (("embed", "kv_heads", "head_dim"), P("fsdp", "tensor", None)),  # GQA key/value
        (("heads", "head_dim", "embed"), P("tensor", None, "fsdp")),  # attention output
        (("norm",), P(None)),
        (("embed", "types", "head_dim"), P("fsdp", None, None)),  # GlobalPointer head
        (("embed", "classes"), P("fsdp", None)),
        (("layers", "embed", "mlp"), P(None, "fsdp", "tensor")),  # scanned stack
        (("batch", "length", "embed"), P(("data", "fsdp"), None, None)),  # hidden states
        (("batch", "length", "vocab"), P(("data", "fsdp"), None, "tensor")),  # logits
        (P("embed", "mlp"), P("fsdp", "tensor")),  # logical names held in a PartitionSpec
        ((None, "mlp"), P(None, "tensor")),
        ((), P()),
    ],
)
def test_typical_specs(mesh, logical_axes, spec):
    assert logical_to_mesh_spec(logical_axes) == spec
    assert logical_to_mesh_spec(logical_axes, mesh=mesh) == spec  # all axes have size 2


def test_size_one_and_missing_mesh_axes_are_dropped():
    data_only = make_mesh()  # (8, 1, 1)
    hidden = ("batch", "length", "embed")
    assert logical_to_mesh_spec(hidden, mesh=data_only) == P("data", None, None)
    assert logical_to_mesh_spec(("embed", "mlp"), mesh=data_only) == P(None, None)
    assert logical_to_mesh_spec(("batch",), mesh=make_mesh(1, -1)) == P("fsdp")
    one_axis = jax.make_mesh((8,), ("data",))
    assert logical_to_mesh_spec(("batch", "vocab"), mesh=one_axis) == P("data", None)


@pytest.mark.parametrize(
    ("logical_axes", "spec"),
    [
        (("embed", "embed"), P("fsdp", None)),  # second use of fsdp is replicated
        (("mlp", "heads"), P("tensor", None)),
        (("heads", "vocab", "kv_heads"), P("tensor", None, None)),
        (("embed", "batch"), P("fsdp", "data")),  # batch keeps its still-free axis
        (("batch", "embed"), P(("data", "fsdp"), None)),
    ],
)
def test_a_mesh_axis_shards_at_most_one_dimension(mesh, logical_axes, spec):
    assert logical_to_mesh_spec(logical_axes, mesh=mesh) == spec


def test_fallback_rules_and_overrides():
    fallback = (("mlp", "tensor"), ("mlp", "fsdp"), *DEFAULT_RULES)
    assert logical_to_mesh_spec(("heads", "mlp"), fallback) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("mlp",), fallback) == P("tensor")
    sequence_parallel = (("length", "tensor"), *DEFAULT_RULES)
    assert logical_to_mesh_spec(("batch", "length", "embed"), sequence_parallel) == P(
        ("data", "fsdp"), "tensor", None
    )
    replicate_embed = (("embed", None), *DEFAULT_RULES)
    assert logical_to_mesh_spec(("embed", "mlp"), replicate_embed) == P(None, "tensor")


@settings(max_examples=60)
@given(
    names=st.lists(st.sampled_from([*LOGICAL_NAMES, None]), max_size=6),
    sizes=st.sampled_from([(2, 2, 2), (8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4)]),
)
def test_spec_property_no_axis_twice_and_rank_kept(names, sizes):
    mesh = make_mesh(*sizes)
    spec = logical_to_mesh_spec(names, mesh=mesh)
    assert len(spec) == len(names)
    used = [axis for entry in spec if entry is not None
            for axis in ((entry,) if isinstance(entry, str) else entry)]
    assert len(used) == len(set(used))
    assert all(mesh.shape[axis] > 1 for axis in used)
    for name, entry in zip(names, spec, strict=True):
        if name is None:
            assert entry is None


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match=r"logical axis 'hidden' has no rule; rules cover: batch"):
        logical_to_mesh_spec(("batch", "hidden"))


def test_malformed_inputs_are_errors():
    with pytest.raises(ValueError, match=r"`logical_axes` must be a sequence .* got 'embed'"):
        logical_to_mesh_spec("embed")
    with pytest.raises(ValueError, match=r"`logical_axes` entries must be str or None, got 3"):
        logical_to_mesh_spec(("embed", 3))
    with pytest.raises(ValueError, match=r"rule for logical axis 'mlp' must map to .* got 4"):
        logical_to_mesh_spec(("mlp",), (("mlp", 4),))


# ---------------------------------------------------------------------- real arrays


def test_device_put_shards_as_the_rules_say(mesh, rng):
    kernel = rng.normal(size=(16, 8)).astype(np.float32)
    x = jax.device_put(kernel, logical_sharding(("embed", "mlp"), mesh))
    assert x.sharding.spec == P("fsdp", "tensor")  # device_put keeps the spec as given
    assert {shard.data.shape for shard in x.addressable_shards} == {(8, 4)}
    np.testing.assert_array_equal(np.asarray(x), kernel)


def test_jitted_matmul_with_named_shardings_matches_numpy(mesh, rng):
    x = rng.normal(size=(8, 16)).astype(np.float32)
    w = rng.normal(size=(16, 32)).astype(np.float32)
    in_shardings = (logical_sharding(("batch", "embed"), mesh),
                    logical_sharding(("embed", "mlp"), mesh))
    out_sharding = logical_sharding(("batch", "mlp"), mesh)
    matmul = jax.jit(jnp.matmul, in_shardings=in_shardings, out_shardings=out_sharding)
    y = matmul(jax.device_put(x, in_shardings[0]), jax.device_put(w, in_shardings[1]))
    assert_laid_out(y, mesh, P(("data", "fsdp"), "tensor"))
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_with_logical_constraint_inside_jit(mesh, rng):
    x = rng.normal(size=(8, 16)).astype(np.float32)
    w1 = rng.normal(size=(16, 32)).astype(np.float32)
    w2 = rng.normal(size=(32, 16)).astype(np.float32)

    def mlp(x, w1, w2):
        h = with_logical_constraint(jnp.tanh(x @ w1), ("batch", "mlp"), mesh)
        return h, h @ w2

    h, y = jax.jit(mlp)(x, w1, w2)
    assert_laid_out(h, mesh, P(("data", "fsdp"), "tensor"))
    h64 = np.tanh(x.astype(np.float64) @ w1)
    np.testing.assert_allclose(np.asarray(y), h64 @ w2, rtol=1e-4, atol=1e-4)


def test_with_logical_constraint_uses_the_context_mesh(mesh, rng):
    x = rng.normal(size=(8, 16)).astype(np.float32)
    assert with_logical_constraint(x, ("batch", "embed")) is x  # no mesh anywhere: no-op
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: with_logical_constraint(2 * a, ("batch", "embed")))(x)
    assert_laid_out(y, mesh, P(("data", "fsdp"), None))
    np.testing.assert_allclose(np.asarray(y), 2 * x)


def test_tree_helpers(mesh, rng):
    params = {
        "embedding": rng.normal(size=(32, 8)).astype(np.float32),
        "layers": [{"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                    "scale": np.ones(8, np.float32)}],
        "step": np.int32(3),
    }
    logical = {
        "embedding": ("vocab", "embed"),
        "layers": [{"kernel": ("embed", "mlp"), "scale": ("norm",)}],
        "step": P(),
    }
    shardings = tree_shardings(logical, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))

    sharded = shard_pytree(params, logical, mesh)
    specs = jax.tree.map(lambda a: a.sharding.spec, sharded)
    assert specs == {
        "embedding": P("tensor", "fsdp"),
        "layers": [{"kernel": P("fsdp", "tensor"), "scale": P(None)}],
        "step": P(),
    }
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sharded), params)


def test_shard_pytree_rank_mismatch_names_the_path(mesh):
    with pytest.raises(ValueError, match=re.escape(
            "['kernel']: logical axes ('embed',) name 1 dimensions but the array has shape "
            "(8, 16)")):
        shard_pytree({"kernel": np.zeros((8, 16))}, {"kernel": ("embed",)}, mesh)


# ---------------------------------------------------------------------------- NNX


def _tiny_model(rngs):
    from flax import nnx

    return nnx.Sequential(
        nnx.Linear(16, 32, rngs=rngs,
                   kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                     ("embed", "mlp")),
                   bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",))),
        nnx.LayerNorm(32, rngs=rngs),  # no annotations: replicated
    )


def test_nnx_state_shardings(mesh, rng):
    from flax import nnx

    with nnx.use_eager_sharding(False):
        model = _tiny_model(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    shardings = nnx_state_shardings(state, mesh)
    sharded = jax.device_put(state, shardings)
    linear, norm = sharded["layers"][0], sharded["layers"][1]
    assert_laid_out(linear["kernel"].get_value(), mesh, P("fsdp", "tensor"))
    assert_laid_out(linear["bias"].get_value(), mesh, P("tensor"))
    assert_laid_out(norm["scale"].get_value(), mesh, P())

    x = rng.normal(size=(8, 16)).astype(np.float32)
    expected = model(x)
    got = jax.jit(lambda s, a: nnx.merge(graphdef, s)(a))(sharded, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_nnx_abstract_state_and_jitted_init(mesh):
    from flax import nnx

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: _tiny_model(nnx.Rngs(0)))
        shardings = nnx_state_shardings(nnx.state(abstract), mesh)
        state = jax.jit(lambda: nnx.state(_tiny_model(nnx.Rngs(0))), out_shardings=shardings)()
    assert_laid_out(state["layers"][0]["kernel"].get_value(), mesh, P("fsdp", "tensor"))
    assert state["layers"][0]["kernel"].get_value().shape == (16, 32)


def test_nnx_rank_mismatch_names_the_variable(mesh):
    from flax import nnx

    with nnx.use_eager_sharding(False):
        bad = nnx.Linear(4, 8, rngs=nnx.Rngs(0), kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed",)))
    with pytest.raises(ValueError, match=re.escape("name 1 dimensions but the variable has shape "
                                                   "(4, 8)")):
        nnx_state_shardings(nnx.state(bad), mesh)


def test_import_does_not_pull_in_flax():
    code = "import sys, kexue.parallel; print('flax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
