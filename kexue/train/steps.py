"""Pure, jitted train and eval steps over a `TrainState`.

    train_step = make_train_step(loss_fn, tx, abstract_state, mesh)
    state, metrics = train_step(state, batch)      # `state` is donated
    eval_step = make_eval_step(task.eval_stats, abstract_state, mesh)
    sums = eval_step(state, batch, stream)         # per-batch sums, added by the caller

`loss_fn(model, batch, rng) -> (loss, aux)` takes the merged `nnx.Module`, a batch
(pytree of arrays whose leading axis is the global batch) and a PRNG key, and returns
a scalar loss and a dict of scalar metrics. Step `s` uses the key
`fold_in(state.rng, s)` (micro-batch `i`: `fold_in(that, i)`), so a resumed run
draws the same numbers as an uninterrupted one.

Batches are split over the `("data", "fsdp")` mesh axes on their leading dimension
(the `batch` logical rule), the state keeps the shardings of `abstract_train_state`,
metrics are replicated. With `grad_accum_steps = k` the batch is cut into `k`
micro-batches of rows `i, i+k, i+2k, …` (each device keeps its rows), the gradients
are averaged with `lax.scan`, and the update equals that of the whole batch when the
loss is a mean over equal-sized micro-batches.

Non-finite guard: when the loss or any gradient is NaN/Inf, or the update would turn
a finite entry of the parameters, optimizer state or model state into NaN/Inf (a
finite step can overflow, e.g. with a far too large learning rate), parameters,
optimizer state and model state are left exactly as they were, `step` still
advances, and `nonfinite_steps` / `consecutive_nonfinite` count the skip (metrics
report both and `nonfinite` = 1 for this step). Entries that were already NaN/Inf
before the step (an optimizer may keep an `inf` on purpose) do not count. A step that
is not skipped computes exactly what it would without the guard.

`compiler_options` go to `jax.jit` as given; `cpu_compiler_options` gives the
XLA:CPU settings kexue uses (donated optimizer slots updated in place, and with
rematerialisation a scheduler that keeps each block's recomputation next to its
backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kexue.models.layers import REMAT_CPU_COMPILER_OPTIONS
from kexue.ops._checks import check_int
from kexue.optim import CPU_COMPILER_OPTIONS
from kexue.parallel import DEFAULT_RULES, LogicalRules, logical_sharding
from kexue.train.state import TrainState, train_state_shardings

__all__ = ["LossFn", "StatsFn", "cpu_compiler_options", "loss_stats", "make_eval_step",
           "make_train_step"]

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
#: `(model, batch, stream) -> dict of sums` over one evaluation batch.
StatsFn = Callable[[nnx.Module, Any, str], Mapping[str, jax.Array]]

_RESERVED = ("loss", "grad_norm", "relative_update", "nonfinite", "nonfinite_steps",
             "consecutive_nonfinite")


def cpu_compiler_options(mesh: Mesh, *, remat: bool = False) -> dict[str, Any] | None:
    """XLA:CPU options for a train step on `mesh` (None on other platforms).

    `optim.CPU_COMPILER_OPTIONS` lets the donated optimizer slots be updated in place
    (without it XLA copies every donated slot each step; benchmarks/RESULTS.md), and
    with `remat` the scheduler keeps each block's recomputation next to its backward
    pass so rematerialisation saves memory (`models.REMAT_CPU_COMPILER_OPTIONS`).
    """
    if mesh.devices.flat[0].platform != "cpu":
        return None
    options = dict(CPU_COMPILER_OPTIONS)
    if remat:
        options.update(REMAT_CPU_COMPILER_OPTIONS)
    return options


def _split_model(model: nnx.Module) -> Any:
    return nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])


def _check_aux(aux: Mapping[str, Any]) -> dict[str, jax.Array]:
    if not isinstance(aux, Mapping):
        raise ValueError(f"loss_fn must return (loss, dict of metrics), got aux {type(aux)}")
    clash = sorted(set(aux).intersection(_RESERVED))
    if clash:
        raise ValueError(f"loss_fn metrics {clash} clash with names the step reports: "
                         f"{list(_RESERVED)}")
    return {name: jnp.asarray(value, jnp.float32) for name, value in aux.items()}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _stays_finite(new: Any, old: Any) -> jax.Array:
    """True unless some entry finite in `old` is NaN/Inf in `new` (inexact leaves)."""
    checks = [jnp.all(jnp.isfinite(n) | ~jnp.isfinite(o))
              for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
              if jnp.issubdtype(n.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.array(True)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    abstract_state: TrainState, mesh: Mesh, *,
                    rules: LogicalRules = DEFAULT_RULES, grad_accum_steps: int = 1,
                    donate: bool = True, compiler_options: Mapping[str, Any] | None = None
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """A jitted `(state, batch) -> (state, metrics)` training step (see the module doc).

    Args:
      loss_fn: `(model, batch, rng) -> (loss, aux)`, loss a float scalar, aux a dict
        of float scalars (averaged over micro-batches).
      tx: the optax transformation whose state is `state.opt_state`.
      abstract_state: `abstract_train_state(...)` (or a concrete state): gives the
        state's shardings for `in_shardings` / `out_shardings`.
      mesh: the mesh; batches are sharded over its `data` and `fsdp` axes.
      rules: logical-axis rules (for the `batch` axis).
      grad_accum_steps: number of micro-batches per step; must divide the batch.
      donate: donate the input state's buffers to the output (the caller must not
        reuse the old state).
      compiler_options: XLA compiler options of the jitted step (see
        `cpu_compiler_options`); None: XLA's defaults.

    Returns:
      The jitted step. `metrics` holds `loss`, the aux metrics, `grad_norm`,
      `relative_update` (`‖Δθ‖₂ / ‖θ‖₂` over all parameters, 0 when skipped),
      `nonfinite` (1 if this step was skipped), `nonfinite_steps` and
      `consecutive_nonfinite`.
    """
    check_int("grad_accum_steps", grad_accum_steps)
    graphdef = abstract_state.graphdef
    batch_sharding = logical_sharding(("batch",), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def loss_and_state(params: Any, model_state: Any, batch: Any, rng: jax.Array):
        model = nnx.merge(graphdef, params, model_state)
        loss, aux = loss_fn(model, batch, rng)
        return jnp.asarray(loss, jnp.float32), (_check_aux(aux), _split_model(model))

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    def micro_batches(batch: Any) -> Any:
        def split(x: jax.Array) -> jax.Array:
            if x.shape[0] % grad_accum_steps:
                raise ValueError(f"batch dimension {x.shape[0]} (leaf shape {x.shape}) is not "
                                 f"divisible by grad_accum_steps={grad_accum_steps}")
            rows = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return jnp.swapaxes(rows, 0, 1)
        return jax.tree.map(split, batch)

    def gradients(state: TrainState, batch: Any, rng: jax.Array):
        if grad_accum_steps == 1:
            (loss, (aux, model_state)), grads = grad_fn(state.params, state.model_state,
                                                        batch, rng)
            return loss, aux, model_state, grads

        def body(carry, inputs):
            model_state, loss_sum, aux_sum, grad_sum = carry
            index, micro = inputs
            micro = jax.lax.with_sharding_constraint(micro, batch_sharding)
            (loss, (aux, model_state)), grads = grad_fn(
                state.params, model_state, micro, jax.random.fold_in(rng, index))
            add = lambda total, value: total + value  # noqa: E731
            return (model_state, loss_sum + loss, jax.tree.map(add, aux_sum, aux),
                    jax.tree.map(add, grad_sum, grads)), None

        zeros = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jnp.zeros(x.shape, jnp.result_type(x)), tree)
        first = jax.tree.map(lambda x: x[0], micro_batches(batch))
        aux_shape = jax.eval_shape(lambda: grad_fn(state.params, state.model_state, first,
                                                   rng)[0][1][0])
        init = (state.model_state, jnp.zeros((), jnp.float32), zeros(aux_shape),
                zeros(state.params))
        (model_state, loss, aux, grads), _ = jax.lax.scan(
            body, init, (jnp.arange(grad_accum_steps), micro_batches(batch)))
        scale = 1.0 / grad_accum_steps
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        return loss * scale, jax.tree.map(lambda a: a * scale, aux), model_state, grads

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, aux, model_state, grads = gradients(state, batch, rng)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype), new, old)

        old = (state.params, state.model_state, state.opt_state)
        candidate = keep_if(finite, (params, model_state, opt_state), old)
        # Checked after a barrier: the fusions computing the new state stay as they are
        # without the check, so a step that is not skipped rounds exactly the same; a
        # `cond` (not a second `where` over every array) keeps XLA's compile-time
        # memory as it was.
        candidate = jax.lax.optimization_barrier(candidate)
        stays = _stays_finite(candidate, old)
        new_params, new_model_state, new_opt_state = jax.lax.cond(
            stays, lambda: candidate, lambda: old)
        finite = finite & stays
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        consecutive = jnp.where(finite, 0, state.consecutive_nonfinite + 1).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=new_params, model_state=new_model_state,
            opt_state=new_opt_state, nonfinite_steps=state.nonfinite_steps + skipped,
            consecutive_nonfinite=consecutive,
        )
        # ‖Δθ‖ / ‖θ‖ over all parameters: the step size actually taken, whatever the
        # optimizer (Amos's per-tensor rates decay on their own; 0 for a skipped step).
        relative = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(state.params),
                                                          jnp.finfo(jnp.float32).tiny)
        metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
                   "relative_update": jnp.where(finite, relative, 0.0).astype(jnp.float32),
                   "nonfinite": skipped, "nonfinite_steps": new_state.nonfinite_steps,
                   "consecutive_nonfinite": consecutive}
        return new_state, metrics

    state_shardings = train_state_shardings(abstract_state)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else (),
                   compiler_options=dict(compiler_options) if compiler_options else None)


def loss_stats(loss_fn: LossFn) -> StatsFn:
    """Evaluation sums of a plain loss: `loss` and its metrics summed, and `batches`.

    `finalize_mean` turns their totals into per-batch means. The loss sees a fixed
    key (evaluation runs with the model in eval mode, so dropout draws nothing).
    """
    def stats(model: nnx.Module, batch: Any, stream: str) -> dict[str, jax.Array]:
        del stream
        loss, aux = loss_fn(model, batch, jax.random.key(0))
        return {"loss": jnp.asarray(loss, jnp.float32), **_check_aux(aux),
                "batches": jnp.ones((), jnp.float32)}

    return stats


def make_eval_step(stats_fn: StatsFn, abstract_state: TrainState, mesh: Mesh, *,
                   rules: LogicalRules = DEFAULT_RULES
                   ) -> Callable[[TrainState, Any, str], dict[str, jax.Array]]:
    """A jitted `(state, batch, stream) -> sums` evaluation step (`stream` static).

    The model is put in evaluation mode (`model.eval()`: dropout off, running
    statistics used) and nothing is updated; `stats_fn(model, batch, stream)` returns
    the batch's sums (see `kexue.tasks`), replicated.
    """
    graphdef = abstract_state.graphdef
    batch_sharding = logical_sharding(("batch",), mesh, rules)

    def step(state: TrainState, batch: Any, stream: str) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state.params, state.model_state)
        model.eval()
        return {name: jnp.asarray(value) for name, value in stats_fn(model, batch, stream).items()}

    return jax.jit(step, static_argnames=("stream",),
                   in_shardings=(train_state_shardings(abstract_state), batch_sharding),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
