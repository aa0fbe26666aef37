"""From a config to a mesh, and from a model constructor to sharded parameters.

    mesh = mesh_from_config(config)                       # config.mesh.{data,fsdp,tensor}
    model = init_sharded(lambda: build_model(config, rngs=nnx.Rngs(0)), mesh)
    batch = shard_batch(batch, mesh)                      # leading axis over (data, fsdp)

`init_sharded` runs the constructor inside `jax.jit` with `out_shardings` taken from
the parameters' logical axes, so each device computes and holds only its own shards:
the full model never exists on one device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from kexue.parallel.mesh import MESH_AXES, make_mesh
from kexue.parallel.rules import (
    DEFAULT_RULES,
    LogicalRules,
    logical_sharding,
    nnx_state_shardings,
)

__all__ = ["batch_shardings", "init_sharded", "mesh_from_config", "shard_batch"]


def mesh_from_config(config: Any, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh from `config.mesh.{data, fsdp, tensor}`.

    Missing sizes default to `data=-1, fsdp=1, tensor=1` (pure data parallelism); one
    size may be -1 and absorbs the devices the others leave.

    Args:
      config: a `ConfigDict` (or mapping) with a `mesh` section, or the section itself.
      devices: the devices to arrange (default: all global devices).

    Raises:
      ValueError: a size is not a positive int or -1, two are -1, or the sizes do not
        match the device count; the message names the `mesh.*` keys and the count.
    """
    section = config["mesh"] if "mesh" in config else config
    unknown = sorted(set(section.keys()) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config key(s) {['mesh.' + k for k in unknown]} are unknown; "
                         f"expected keys among {list(MESH_AXES)}.")
    sizes = {"data": section.get("data", -1), "fsdp": section.get("fsdp", 1),
             "tensor": section.get("tensor", 1)}
    count = len(jax.devices() if devices is None else devices)
    try:
        return make_mesh(**sizes, devices=devices)
    except ValueError as error:
        given = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
        raise ValueError(f"config `mesh` ({given}) does not fit the {count} devices: "
                         f"{error}") from error


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
        own `nnx.Rngs` (e.g. `lambda: build_model(config, rngs=nnx.Rngs(seed))`), as
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
