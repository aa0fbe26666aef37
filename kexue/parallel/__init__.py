"""Mesh construction, logical-axis sharding rules and multi-process start-up.

    info = initialize_distributed()          # no-op on a single host
    mesh = make_mesh(1, -1)                  # ("data", "fsdp", "tensor") = (1, n, 1)
    model = init_sharded(lambda: build(rngs=nnx.Rngs(0)), mesh)  # created sharded
    params = shard_pytree(params, logical_axes, mesh)
    batch = host_local_to_global(local_batch, mesh)

Imports JAX only; Flax is imported inside `nnx_state_shardings` and `init_sharded`
when they are called.
"""

from kexue.parallel.distributed import DistributedInfo, host_local_to_global, initialize_distributed
from kexue.parallel.mesh import MESH_AXES, make_mesh
from kexue.parallel.rules import (
    DEFAULT_RULES,
    LogicalRules,
    logical_sharding,
    logical_to_mesh_spec,
    nnx_state_shardings,
    shard_pytree,
    tree_shardings,
    with_logical_constraint,
)
from kexue.parallel.sharding import batch_shardings, init_sharded, reduced_sharding, shard_batch

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "DistributedInfo",
    "LogicalRules",
    "batch_shardings",
    "host_local_to_global",
    "init_sharded",
    "initialize_distributed",
    "logical_sharding",
    "logical_to_mesh_spec",
    "make_mesh",
    "nnx_state_shardings",
    "reduced_sharding",
    "shard_batch",
    "shard_pytree",
    "tree_shardings",
    "with_logical_constraint",
]
