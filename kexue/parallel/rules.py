"""Logical axis names and the one table that maps them onto the mesh.

Models name the dimensions of their parameters and activations by what they mean
(`("embed", "mlp")` for an FFN kernel, `("batch", "length", "embed")` for hidden
states) and never mention devices. A rules table turns those names into a
`PartitionSpec` over the `("data", "fsdp", "tensor")` mesh, so switching between
data, FSDP and tensor parallelism changes the mesh sizes, not the model.

`DEFAULT_RULES`:

| logical name | mesh axes            | used for                                           |
|--------------|----------------------|----------------------------------------------------|
| `batch`      | `("data", "fsdp")`   | examples: split over every data-parallel device    |
| `length`     | —                    | sequence positions (no sequence parallelism)       |
| `embed`      | `fsdp`               | model width: FSDP shards every weight along it     |
| `mlp`        | `tensor`             | FFN / GAU hidden width (Megatron column-row split) |
| `heads`      | `tensor`             | query heads                                        |
| `kv_heads`   | `tensor`             | key/value heads (GQA)                              |
| `head_dim`   | —                    | per-head features, kept whole for RoPE and QKᵀ     |
| `vocab`      | `tensor`             | embedding rows and output logits                   |
| `positions`  | —                    | rows of a learned absolute position table (BERT)   |
| `token_types`| —                    | rows of a token-type (segment) table               |
| `types`      | —                    | GlobalPointer entity types                         |
| `classes`    | —                    | classifier outputs                                 |
| `norm`       | —                    | LayerNorm / RMSNorm scales and biases              |
| `layers`     | —                    | stacked (scanned) layer index                      |

How a tuple of logical names becomes a spec (left to right):

1. Every rule whose name matches is a candidate, in table order; a name with no
   rule is an error (a typo must not silently replicate a weight).
2. The first candidate that maps to `None` or whose mesh axes are all still free is
   taken. If every candidate clashes with axes already used by an earlier
   dimension, the dimension keeps the first candidate's free axes, and is
   replicated when none are left: a mesh axis shards at most one dimension. Hence
   activations `("batch", "length", "embed")` shard `batch` over data×fsdp and leave
   `embed` whole, while the weight `("embed", "mlp")` is split over fsdp×tensor.
3. Given a mesh, axes that it lacks or whose size is 1 are dropped, so one table
   serves every mesh shape (and prints short specs).

To change the mapping, put your rules in front of the defaults:
`rules = (("length", "tensor"), *DEFAULT_RULES)`; earlier rules are tried first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MeshAxes: TypeAlias = str | tuple[str, ...] | None
LogicalRules: TypeAlias = Sequence[tuple[str, MeshAxes]]
LogicalAxes: TypeAlias = Sequence[str | None] | PartitionSpec

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("positions", None),
    ("token_types", None),
    ("types", None),
    ("classes", None),
    ("norm", None),
    ("layers", None),
)


def _target_axes(name: str, target: Any) -> tuple[str, ...]:
    """The mesh axes of one rule's right-hand side, as a tuple (empty for None)."""
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    if isinstance(target, tuple) and all(isinstance(axis, str) for axis in target):
        return target
    raise ValueError(
        f"rule for logical axis {name!r} must map to a mesh axis name, a tuple of them "
        f"or None, got {target!r}"
    )


def _check_logical_axes(logical_axes: Any) -> tuple[str | None, ...]:
    if isinstance(logical_axes, PartitionSpec):  # e.g. from nnx.get_partition_spec
        logical_axes = tuple(logical_axes)
    if isinstance(logical_axes, str) or not isinstance(logical_axes, Sequence):
        raise ValueError(
            "`logical_axes` must be a sequence of logical names (one per array "
            f"dimension, None for unsharded), got {logical_axes!r}"
        )
    for name in logical_axes:
        if name is not None and not isinstance(name, str):
            raise ValueError(
                f"`logical_axes` entries must be str or None, got {name!r} in {logical_axes!r}"
            )
    return tuple(logical_axes)


def _choose(name: str, rules: LogicalRules, used: set[str]) -> tuple[str, ...]:
    """Mesh axes for one logical name, given the axes earlier dimensions took."""
    candidates = [_target_axes(name, target) for rule_name, target in rules if rule_name == name]
    if not candidates:
        known = ", ".join(sorted({rule_name for rule_name, _ in rules}))
        raise ValueError(f"logical axis {name!r} has no rule; rules cover: {known}")
    for axes in candidates:
        if not used.intersection(axes):
            return axes
    return tuple(axis for axis in candidates[0] if axis not in used)


def logical_to_mesh_spec(
    logical_axes: LogicalAxes,
    rules: LogicalRules = DEFAULT_RULES,
    mesh: Mesh | AbstractMesh | None = None,
) -> PartitionSpec:
    """Maps one array's logical axis names to a `PartitionSpec` (see the module doc).

    Args:
      logical_axes: one entry per array dimension: a logical name, or None for a
        dimension left unsharded. `()` is a scalar (fully replicated). A
        `PartitionSpec` of logical names is accepted too.
      rules: `(logical name, mesh axes)` pairs, earlier pairs winning.
      mesh: when given, mesh axes it lacks or of size 1 are dropped from the spec.

    Returns:
      A `PartitionSpec` with one entry per dimension: None, a mesh axis name, or a
      tuple of mesh axis names (major to minor).

    Raises:
      ValueError: a name has no rule, or a rule's target is malformed.

    Example: `logical_to_mesh_spec(("batch", "length", "embed"))` is
    `P(("data", "fsdp"), None, None)`.
    """
    logical_axes = _check_logical_axes(logical_axes)
    sizes = None if mesh is None else dict(mesh.shape)
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for name in logical_axes:
        axes = () if name is None else _choose(name, rules, used)
        used.update(axes)
        if sizes is not None:
            axes = tuple(axis for axis in axes if sizes.get(axis, 1) > 1)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def logical_sharding(
    logical_axes: LogicalAxes, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> NamedSharding:
    """`NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules, mesh))`."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules, mesh))


def _is_logical_axes(node: Any) -> bool:
    """A leaf of a logical-axes tree: a plain tuple of names/None, or a PartitionSpec."""
    if isinstance(node, PartitionSpec):
        return True
    return type(node) is tuple and all(entry is None or isinstance(entry, str) for entry in node)


def tree_shardings(
    logical_axes_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> Any:
    """Maps a pytree whose leaves are logical-axes tuples to a pytree of `NamedSharding`s.

    A leaf is a plain `tuple` of names/None (so `()` is a replicated scalar) or a
    `PartitionSpec` of logical names; lists, dicts and named tuples are containers.
    The result has the same structure and can be passed as `in_shardings` /
    `out_shardings` to `jax.jit` or to `jax.device_put`.
    """
    return jax.tree.map(
        lambda axes: logical_sharding(axes, mesh, rules), logical_axes_tree,
        is_leaf=_is_logical_axes,
    )


def shard_pytree(
    tree: Any, logical_axes_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> Any:
    """`jax.device_put`s every array of `tree` with the sharding its logical axes give.

    Args:
      tree: a pytree of arrays (NumPy or JAX).
      logical_axes_tree: the same structure with a logical-axes tuple in place of
        each array (see `tree_shardings`).
      mesh, rules: as in `logical_sharding`.

    Raises:
      ValueError: an array's rank differs from the length of its logical axes (the
        message gives the path), or a logical name has no rule.
    """

    def check_rank(path: Any, axes: Any, leaf: Any) -> None:
        if len(axes) != np.ndim(leaf):
            raise ValueError(
                f"{jax.tree_util.keystr(path) or 'tree'}: logical axes {tuple(axes)} name "
                f"{len(axes)} dimensions but the array has shape {np.shape(leaf)}"
            )

    jax.tree_util.tree_map_with_path(check_rank, logical_axes_tree, tree, is_leaf=_is_logical_axes)
    return jax.device_put(tree, tree_shardings(logical_axes_tree, mesh, rules))


def with_logical_constraint(
    x: jax.Array,
    logical_axes: LogicalAxes,
    mesh: Mesh | AbstractMesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> jax.Array:
    """`jax.lax.with_sharding_constraint` by logical names, for activations inside `jit`.

    Args:
      x: array of rank `len(logical_axes)`.
      logical_axes, rules: as in `logical_to_mesh_spec`.
      mesh: the mesh to constrain on. When None, the mesh set with
        `jax.set_mesh(...)` is used; with no mesh set `x` is returned unchanged, so
        models stay runnable on a single device without any set-up.

    Returns:
      `x`, with XLA told to lay it out as the rules say.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
        spec = logical_to_mesh_spec(logical_axes, rules, mesh)
        return jax.lax.with_sharding_constraint(x, spec)
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, mesh, rules))


def nnx_state_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Shardings for a Flax NNX state from each `nnx.Variable`'s logical axis names.

    Variables created through `nnx.with_partitioning(init, ("embed", "mlp"))` (or with
    `out_sharding=` metadata) carry their logical names; those are mapped through
    `rules`. Variables without the metadata (RNG keys, counters, unannotated params)
    are replicated. Build the model under `nnx.use_eager_sharding(False)` (flax ≥
    0.12 otherwise shards at creation time and needs a mesh and flax's own rules),
    typically abstractly with `nnx.eval_shape`, then:

        graphdef, state = nnx.split(model)
        state = jax.device_put(state, nnx_state_shardings(state, mesh))

    The result can equally be `out_shardings` of a jitted init function.

    Args:
      state: an `nnx.State` (or any pytree holding `nnx.Variable`s), concrete or
        abstract.
      mesh, rules: as in `logical_sharding`.

    Returns:
      The same structure with every Variable's value replaced by its `NamedSharding`.

    Raises:
      ValueError: a Variable's logical axes do not match its rank (message gives the
        path), or a name has no rule.
    """
    from flax import nnx

    def variable_sharding(path: Any, variable: Any) -> Any:
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        metadata = variable.get_metadata()
        axes = next(
            (metadata[key] for key in ("out_sharding", "sharding_names", "sharding")
             if metadata.get(key) is not None),
            (),
        )
        shape = np.shape(variable.get_value())
        if axes and len(axes) != len(shape):
            raise ValueError(
                f"{jax.tree_util.keystr(path)}: logical axes {tuple(axes)} name {len(axes)} "
                f"dimensions but the variable has shape {shape}"
            )
        return variable.replace(logical_sharding(tuple(axes), mesh, rules))

    return jax.tree_util.tree_map_with_path(
        variable_sharding, state, is_leaf=lambda node: isinstance(node, nnx.Variable)
    )
