"""Sharded parameters straight from a model constructor, and sharded batches.

    model = init_sharded(lambda: build_model(spec, rngs=nnx.Rngs(0)), mesh)
    batch = shard_batch(batch, mesh)                      # leading axis over (data, fsdp)

`init_sharded` runs the constructor inside `jax.jit` with `out_shardings` taken from
the parameters' logical axes, so each device computes and holds only its own shards:
the full model never exists on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kexue.parallel.rules import (
    DEFAULT_RULES,
    LogicalRules,
    logical_sharding,
    nnx_state_shardings,
)

__all__ = ["batch_shardings", "init_sharded", "reduced_sharding", "shard_batch"]


def init_sharded(build: Callable[[], Any], mesh: Mesh,
                 rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Builds an NNX module with every parameter created directly in its sharding.

    `build` is traced twice: once with `nnx.eval_shape` (no memory) to read the
    logical axes of each `nnx.Variable`, then inside `jax.jit` whose `out_shardings`
    are those axes mapped by `rules` (`nnx_state_shardings`). Variables without
    logical axes (RNG state, counters) are replicated. Eager sharding is off during
    both, so the model's own metadata drives the layout.

    Args:
      build: a function of no arguments returning a fresh module; it must create its
        own `nnx.Rngs` (e.g. `lambda: build_model(spec, rngs=nnx.Rngs(seed))`), as
        RNG state captured from outside cannot be updated inside `jax.jit`.
      mesh: the device mesh.
      rules: logical-axis rules.

    Returns:
      The module, its state laid out over `mesh`.
    """
    from flax import nnx

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = nnx_state_shardings(abstract_state, mesh, rules)

        def create():
            return nnx.split(build())[1]

        state = jax.jit(create, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_shardings(batch: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """`NamedSharding` per array of `batch`: leading axis `batch`, the rest whole."""
    return jax.tree.map(
        lambda x: logical_sharding(("batch",) + (None,) * (np.ndim(x) - 1), mesh, rules),
        batch)


def shard_batch(batch: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """`jax.device_put` every array of `batch` split over `(data, fsdp)` on axis 0.

    For one process; multi-host input goes through `host_local_to_global`.
    """
    return jax.device_put(batch, batch_shardings(batch, mesh, rules))


def reduced_sharding(sharding: NamedSharding, shape: tuple[int, ...],
                     reduced_shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of an array of `shape` carried over to one derived from it.

    For an optimizer slot that mirrors a parameter (`reduced_shape` equal to `shape`
    except along axes reduced to size 1): each axis keeps the parameter's mesh axes
    where the sizes agree and is whole where the slot reduced it; a slot of another
    rank (a scalar, say) is replicated.
    """
    if len(reduced_shape) != len(shape):
        return NamedSharding(sharding.mesh, PartitionSpec())
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    kept = [entry if reduced == size else None
            for entry, reduced, size in zip(spec, reduced_shape, shape, strict=True)]
    return NamedSharding(sharding.mesh, PartitionSpec(*kept))
