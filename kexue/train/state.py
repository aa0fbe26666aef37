"""The train state of a Flax NNX model as one pytree of arrays, created sharded.

    state = create_train_state(lambda: build_model(config, rngs=nnx.Rngs(0)), tx, mesh)
    model = state.model()                   # nnx.merge(graphdef, params, model_state)
    # some parameters from elsewhere (e.g. a pretrained encoder), set after the init:
    state = create_train_state(factory, tx, mesh,
                               init_params=lambda m: load_pretrained_params(m, ckpt))

A `TrainState` holds the model split by `nnx.split(model, nnx.Param, ...)` into
`params` (what the optimizer updates) and `model_state` (everything else: batch
statistics, RNG streams, counters), both as pure `nnx.State`s of arrays (no
`Variable` wrappers, `nnx.as_pure`), plus the optimizer state of any optax
transformation, the step, a base PRNG key and the count of skipped non-finite
steps. The `graphdef` is static pytree metadata, so the whole state can be passed to
and returned from `jax.jit` and its structure compared with `==`.

Parameters are placed by their logical axis names (`kexue.parallel.nnx_state_shardings`);
optimizer slots inherit the placement of the parameter they mirror (matched by the
parameter's path at the end of the slot's path), with dimensions the slot reduced
to size 1 left whole; everything else is replicated. A dimension that the mesh
axes of its rule do not divide evenly is left whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kexue.optim import parameter_path
from kexue.parallel import DEFAULT_RULES, LogicalRules, nnx_state_shardings, reduced_sharding

__all__ = [
    "TrainState",
    "abstract_train_state",
    "create_train_state",
    "train_state_shardings",
]


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as a pytree of arrays.

    Attributes:
      step: int32 `[]`, the number of steps taken (skipped non-finite steps included).
      params: pure `nnx.State` of the model's `nnx.Param`s.
      model_state: pure `nnx.State` of the model's other variables.
      opt_state: the optax state of `params`.
      rng: PRNG key `[]` (typed); step `s` draws from `fold_in(rng, s)`.
      nonfinite_steps: int32 `[]`, steps skipped because the loss, a gradient or the
        updated state was not finite.
      consecutive_nonfinite: int32 `[]`, the length of the current run of skipped steps.
      graphdef: the model's `nnx.GraphDef` (static).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array
    consecutive_nonfinite: jax.Array
    graphdef: Any = struct.field(pytree_node=False)

    def model(self) -> nnx.Module:
        """The NNX module holding this state's parameters and variables."""
        return nnx.merge(self.graphdef, self.params, self.model_state)


def _split(model: nnx.Module) -> tuple[Any, Any, Any]:
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(model_state)


def _divisible(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`sharding` with every dimension it cannot split evenly left whole.

    A rule may map a small dimension (say 2 output units) to a larger mesh axis;
    such a dimension is replicated instead of failing at placement.
    """
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    entries = []
    for entry, size in zip(spec, shape, strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        count = int(np.prod([sharding.mesh.shape[axis] for axis in axes]))
        entries.append(entry if size % count == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*entries))


def _opt_state_shardings(abstract_opt_state: Any, abstract_params: Any,
                         param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for optimizer state leaves: those of the parameter they mirror."""
    params = {tuple(parameter_path(path).split("/")): (leaf, sharding)
              for (path, leaf), sharding in zip(
                  jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                  jax.tree.leaves(param_shardings), strict=True)}
    longest = max((len(path) for path in params), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(path: tuple[Any, ...], slot: Any) -> NamedSharding:
        names = tuple(parameter_path(path).split("/"))
        for length in range(min(longest, len(names)), 0, -1):
            match = params.get(names[-length:])
            if match is not None:
                param, sharding = match
                return reduced_sharding(sharding, tuple(np.shape(param)),
                                        tuple(np.shape(slot)))
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def _build(model_factory: Callable[[], nnx.Module]) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        return model_factory()


def train_state_shardings(abstract_state: TrainState) -> TrainState:
    """The `NamedSharding` of every leaf of an `abstract_train_state` (see the module doc)."""
    return jax.tree.map(lambda leaf: leaf.sharding, abstract_state)


def abstract_train_state(model_factory: Callable[[], nnx.Module],
                         tx: optax.GradientTransformation, mesh: Mesh,
                         rules: LogicalRules = DEFAULT_RULES, *, seed: int = 0) -> TrainState:
    """The `TrainState` as `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s.

    Nothing is allocated: this is the restore target of a checkpoint and the source
    of `in_shardings`/`out_shardings` of the steps.
    """
    abstract_model = nnx.eval_shape(lambda: _build(model_factory))
    graphdef, variables_params, variables_rest = nnx.split(abstract_model, nnx.Param, ...)
    param_shardings = nnx.as_pure(nnx_state_shardings(variables_params, mesh, rules))
    rest_shardings = nnx.as_pure(nnx_state_shardings(variables_rest, mesh, rules))
    params, model_state = nnx.as_pure(variables_params), nnx.as_pure(variables_rest)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = _opt_state_shardings(opt_state, params, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def attach(tree: Any, shardings: Any) -> Any:
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=_divisible(sharding, leaf.shape)),
            tree, shardings)

    def scalar(dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), dtype, sharding=replicated)

    return TrainState(
        step=scalar(jnp.int32),
        params=attach(params, param_shardings),
        model_state=attach(model_state, rest_shardings),
        opt_state=attach(opt_state, opt_shardings),
        rng=jax.eval_shape(lambda: jax.random.key(seed)).update(sharding=replicated),
        nonfinite_steps=scalar(jnp.int32),
        consecutive_nonfinite=scalar(jnp.int32),
        graphdef=graphdef,
    )


def create_train_state(model_factory: Callable[[], nnx.Module],
                       tx: optax.GradientTransformation, mesh: Mesh,
                       rules: LogicalRules = DEFAULT_RULES, *, seed: int = 0,
                       init_params: Callable[[nnx.Module], Any] | None = None) -> TrainState:
    """Builds model and optimizer state inside `jax.jit` with their final shardings.

    Each device computes and stores only its shards; the full model never exists on
    one device.

    Args:
      model_factory: no-argument function returning a fresh `nnx.Module`; it must
        create its own `nnx.Rngs` (RNG state from outside cannot be traced). It is
        called under `nnx.use_eager_sharding(False)`; parameters declare logical axes
        through `out_sharding=` / `nnx.with_partitioning` metadata.
      tx: any optax transformation; `tx.init` sees the pure parameter state.
      mesh: the `("data", "fsdp", "tensor")` mesh.
      rules: logical-axis rules.
      seed: seed of the state's base PRNG key (`jax.random.key(seed)`).
      init_params: optional; called once with the initialised model (its variables
        already placed on the mesh) to set some of its parameters in place, e.g.
        `kexue.models.load_pretrained_params`. The values it sets are cast to each
        parameter's dtype and placed with its sharding (they are arguments of the
        placement, never constants of a compiled init); the optimizer state is then
        initialised from the resulting parameters. Its return value is ignored.

    Returns:
      A `TrainState` at step 0.

    Raises:
      ValueError: `init_params` changed the model's structure or a parameter's shape
        (the paths are named).
    """
    abstract = abstract_train_state(model_factory, tx, mesh, rules, seed=seed)

    def init() -> TrainState:
        _, params, model_state = _split(_build(model_factory))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
            opt_state=tx.init(params), rng=jax.random.key(seed),
            nonfinite_steps=jnp.zeros((), jnp.int32),
            consecutive_nonfinite=jnp.zeros((), jnp.int32), graphdef=abstract.graphdef)

    shardings = train_state_shardings(abstract)
    state = jax.jit(init, out_shardings=shardings)()
    if init_params is None:
        return state
    model = state.model()
    init_params(model)
    _, params, model_state = _split(model)
    params = _placed("params", params, abstract.params, shardings.params)
    model_state = _placed("model_state", model_state, abstract.model_state,
                          shardings.model_state)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, model_state=model_state, opt_state=opt_state)


def _placed(name: str, tree: Any, abstract: Any, shardings: Any) -> Any:
    """`tree` cast to `abstract`'s dtypes and put on `shardings`, after checking that
    it has `abstract`'s structure and shapes."""
    paths = [parameter_path(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(abstract)[0]]
    if jax.tree.structure(tree) != jax.tree.structure(abstract):
        found = [parameter_path(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(tree)[0]]
        changed = sorted(set(paths).symmetric_difference(found))
        raise ValueError(f"`init_params`: changed the structure of the model's {name} "
                         f"(paths added or removed: {changed or 'none; their types changed'})")
    wrong = [f"{path}: expected {list(a.shape)}, got {list(np.shape(x))}"
             for path, a, x in zip(paths, jax.tree.leaves(abstract), jax.tree.leaves(tree),
                                   strict=True) if tuple(np.shape(x)) != tuple(a.shape)]
    if wrong:
        raise ValueError(f"`init_params`: set {name} of the wrong shape: " + "; ".join(wrong))

    def put(value: Any, target: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
        # a host array goes straight to its shards (never whole onto one device)
        if not isinstance(value, jax.Array):
            value = np.asarray(value, target.dtype)
        elif value.dtype != target.dtype:  # (typed PRNG keys have no astype)
            value = value.astype(target.dtype)
        return jax.device_put(value, sharding)

    return jax.tree.map(put, tree, abstract, shardings)
