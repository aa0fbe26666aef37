"""A model- and data-agnostic training loop: resume, train, evaluate, checkpoint, log.

    result = train_loop(model_factory=lambda: build_model(config, rngs=nnx.Rngs(0)),
                        loss_fn=loss_fn, tx=tx, train_data=iterator, mesh=mesh,
                        config=LoopConfig(num_steps=1000, eval_every=200), workdir=workdir,
                        eval_data=lambda: eval_batches())
    if result.preempted:
        sys.exit(0)

Run twice on the same `workdir` and the second run resumes from the newest readable
checkpoint (state, PRNG key and data-iterator position): its losses and final
parameters equal those of an uninterrupted run bit for bit on CPU. `init_params`
(e.g. pretrained weights) applies only to a run that starts from step 0: a resumed
run takes every parameter from its checkpoint.

`workdir` receives `checkpoints/`, `metrics.jsonl`, `tensorboard/` and, when the
last step is reached, `final_metrics.json` (written atomically: the step, the last
train metrics, the final evaluation, the skipped-step count). A run that finds its
last step already trained (the command rerun after a preemption or a kill at the
very end) keeps a complete `final_metrics.json` and otherwise writes it again,
evaluating the newest checkpoint; `read_final_metrics` refuses an incomplete one.

Each train record holds the interval's mean `loss`, aux metrics, `grad_norm` and
`relative_update` (`‖Δθ‖ / ‖θ‖`, the step size taken, for any optimizer), the
`learning_rate` of the last update when a schedule is given, and `tokens_per_s` /
`steps_per_s` over training time only: the first step's compilation, evaluations and
checkpoint saves are left out (the compilation time is logged once).

One writer per workdir: `train_loop` holds the workdir's `WorkdirLock` for its whole
life (a caller may take it earlier, e.g. before writing its config), and before it
changes anything it checks the workdir's layout (`check_workdir`) and that the newest
checkpoint fits the model (`check_resume`), so a refused resume leaves the workdir as
it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kexue.ops._checks import check_int
from kexue.parallel import DEFAULT_RULES, LogicalRules, host_local_to_global
from kexue.train.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
)
from kexue.train.metrics import MetricWriter, ProgressBar, format_duration, format_number, scalars
from kexue.train.preemption import PreemptionGuard
from kexue.train.state import TrainState, abstract_train_state, create_train_state
from kexue.train.steps import LossFn, StatsFn, loss_stats, make_eval_step, make_train_step
from kexue.train.workdir import (
    WorkdirError,
    WorkdirLock,
    check_workdir,
    read_json,
    write_json_atomic,
)

__all__ = ["FINAL_METRICS", "OPERATOR_ERRORS", "CheckpointableIterator", "LoopConfig",
           "NonFiniteError", "TrainResult", "check_resume", "count_tokens", "evaluate",
           "finalize_mean", "read_final_metrics", "train_loop"]

FINAL_METRICS = "final_metrics.json"


class CheckpointableIterator(Protocol):
    """An iterator of this process's batches whose position can be saved and restored."""

    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss, gradient or updated state."""


#: Failures whose message tells an operator what is wrong and what to do (bad config
#: or input, unusable workdir, I/O errors, a diverging run); command-line tools print
#: them in one line (`report_failure`). Anything else is a bug: show its traceback.
OPERATOR_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, WorkdirError, CheckpointSaveError, CheckpointCorruptError,
    NonFiniteError)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What `train_loop` does when; every field can come from a config section.

    Attributes:
      num_steps: the step to train up to (total, counting resumed steps).
      log_every: steps between train-metric records and progress-bar lines
        (records average the interval's steps).
      eval_every: steps between evaluations (0: only after the last step).
      checkpoint_every: steps between checkpoints (the last step and a preemption
        are always saved).
      keep_checkpoints: most recent checkpoints kept.
      best_metric: eval metric whose best checkpoint is kept as well (None: off); it
        counts only for checkpoints saved at an eval step.
      best_mode: "min" or "max".
      grad_accum_steps: micro-batches per step.
      max_consecutive_nonfinite: stop after this many skipped steps in a row (0: never).
      async_checkpointing: write checkpoints in the background.
      seed: seed of the state's PRNG key.
      tensorboard: also write TensorBoard event files.
    """

    num_steps: int
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    best_metric: str | None = None
    best_mode: str = "min"
    grad_accum_steps: int = 1
    max_consecutive_nonfinite: int = 10
    async_checkpointing: bool = True
    seed: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        positive = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                    "grad_accum_steps")
        for name in (*positive, "eval_every", "max_consecutive_nonfinite", "seed"):
            check_int(name, getattr(self, name), least=1 if name in positive else 0)
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode`: expected 'min' or 'max'; got {self.best_mode!r}")
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise ValueError(f"`best_metric`: expected a metric name or None; "
                             f"got {self.best_metric!r}")

    @classmethod
    def from_settings(cls, config: Any) -> LoopConfig:
        """From a `LoopConfig`, or a mapping (anything with `items()`) of its fields.

        Raises:
          ValueError: an unknown key (the nearest valid one is suggested), a missing
            `num_steps`, or a value of the wrong type or range.
        """
        if isinstance(config, LoopConfig):
            return config
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        fields = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in fields:
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean `{near[0]}`?" if near else f"; valid keys: {fields}"
                raise ValueError(f"`{key}`: not a training-loop setting{hint}")
        if "num_steps" not in values:
            raise ValueError("`num_steps`: required; got no value")
        return cls(**values)


@dataclasses.dataclass
class TrainResult:
    """What `train_loop` ends with.

    Attributes:
      state: the final `TrainState`.
      step: the last step taken.
      preempted: the loop stopped on a preemption notice (after saving).
      train_metrics: the last logged train metrics.
      eval_metrics: the last evaluation's metrics (empty if none ran).
      saved_steps: checkpoints this run saved and saw finalized.
    """

    state: TrainState
    step: int
    preempted: bool
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    saved_steps: list[int]


def count_tokens(batch: Any) -> int:
    """Tokens in a host batch: the size of its first integer array (token ids),
    else the leading dimension of its first array (examples)."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(batch)]
    for leaf in leaves:
        if np.issubdtype(leaf.dtype, np.integer):
            return int(leaf.size)
    return int(leaves[0].shape[0]) if leaves else 0


def finalize_mean(totals: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Per-batch means of `loss_stats` totals (every stream together)."""
    sums: dict[str, jax.Array] = {}
    for stream_totals in totals.values():
        for name, value in stream_totals.items():
            sums[name] = sums[name] + value if name in sums else value
    count = sums.pop("batches")
    return {name: value / count for name, value in sums.items()}


def evaluate(eval_step: Callable[..., Mapping[str, jax.Array]], state: TrainState,
             batches: Iterable[Any], mesh: Mesh,
             finalize: Callable[[Mapping[str, Mapping[str, jax.Array]]], Mapping[str, Any]]
             = finalize_mean) -> dict[str, float]:
    """`finalize` of the per-stream totals of `eval_step`'s sums over `batches`.

    Each item of `batches` is a `(stream, host batch)` pair (see `kexue.tasks`) or a
    host batch of the stream "eval"; each process gives its share of every batch.
    The sums are added on the devices batch by batch, so memory does not grow with
    the number of batches. Returns {} when there are no batches.
    """
    totals: dict[str, dict[str, jax.Array]] = {}
    for item in batches:
        stream, batch = item if _is_stream_pair(item) else ("eval", item)
        sums = eval_step(state, host_local_to_global(batch, mesh), stream)
        total = totals.get(stream)
        totals[stream] = dict(sums) if total is None else {
            name: total[name] + value for name, value in sums.items()}
    if not totals:
        return {}
    return scalars(finalize(totals))


def _is_stream_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[kexue.train] {message}", flush=True)


def read_final_metrics(workdir: str | os.PathLike, *, require_eval: bool = True
                       ) -> dict[str, Any]:
    """`<workdir>/final_metrics.json`, checked complete.

    Args:
      workdir: the run directory.
      require_eval: the run evaluates, so `eval` must hold metrics.

    Raises:
      FileNotFoundError: the run has not finished (no file).
      WorkdirError: the file is damaged or incomplete (no `step`, `train` or `eval`
        section, or an empty `eval`); the message says to rerun the training command,
        which evaluates the newest checkpoint and writes it again.
    """
    path = os.path.join(os.fspath(workdir), FINAL_METRICS)
    record = read_json(path, what="the final metrics of a finished run")
    problems = []
    if isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        problems.append("no `step`")
    for section in ("train", "eval"):
        if not isinstance(record.get(section), dict):
            problems.append(f"no `{section}` section")
    if require_eval and isinstance(record.get("eval"), dict) and not record["eval"]:
        problems.append("an empty `eval` section")
    if problems:
        raise WorkdirError(f"{path} is incomplete ({', '.join(problems)}): rerun the training "
                           "command on this workdir; it evaluates the newest checkpoint and "
                           "writes the file again")
    return record


def _last_train_record(workdir: str, step: int) -> dict[str, float]:
    """The train metrics of the newest `metrics.jsonl` record at or before `step`."""
    path = os.path.join(workdir, "metrics.jsonl")
    best: dict[str, Any] = {}
    try:
        with open(path, "rb") as file:
            lines = file.read().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
            at = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record, dict) and record.get("split") == "train" and at <= step \
                and at >= int(best.get("step", -1)):
            best = record
    return {name: value for name, value in best.items()
            if name not in ("step", "time", "split")}


def check_resume(workdir: str | os.PathLike, abstract_state: TrainState) -> int | None:
    """The step a trainer would resume from, checked to fit `abstract_state`; reads only.

    Call it before writing anything into an existing workdir (a config record, say):
    it opens the checkpoints read-only. None: no checkpoint with readable metadata.

    Raises:
      CheckpointMismatchError: the newest checkpoint holds another model or optimizer.
    """
    directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    reader = Checkpointer(directory, read_only=True)
    try:
        return reader.check_latest_compatible(abstract_state)
    finally:
        reader.close()


def _close_all(closers: Iterable[Callable[[], None]], log: Callable[[str], None],
               failing: bool) -> None:
    """Runs every closer; while an error propagates (`failing`) their errors are only
    logged, so they never hide it (e.g. a TensorBoard flush failing on the full disk
    that failed the checkpoint). Otherwise the first one is raised after the rest ran."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except Exception as error:
            if failing:
                log(f"while stopping on an error, also: {type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}")
            elif first is None:
                first = error
    if first is not None:
        raise first


class _TrainMetrics:
    """Fetches step metrics one step late (dispatch stays ahead) and averages an interval."""

    def __init__(self, max_consecutive_nonfinite: int,
                 write: Callable[[int, dict[str, float]], None]):
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.write = write
        self.queue: list[tuple[int, Any]] = []
        self.interval: list[dict[str, float]] = []

    def push(self, step: int, metrics: Any) -> None:
        self.queue.append((step, metrics))

    def fetch(self, keep_last: bool) -> None:
        ready = self.queue[:-1] if keep_last else self.queue
        self.queue = self.queue[-1:] if keep_last else []
        for step, metrics in ready:
            values = scalars(metrics)
            self.interval.append(values)
            limit = self.max_consecutive_nonfinite
            if limit and values["consecutive_nonfinite"] >= limit:
                self.write(step, self.summary())  # the failing steps reach metrics.jsonl
                raise NonFiniteError(
                    f"step {step}: the loss, the gradients or the updated state were "
                    f"non-finite in "
                    f"{values['consecutive_nonfinite']} consecutive steps (limit "
                    f"max_consecutive_nonfinite={limit}; {values['nonfinite_steps']} skipped in "
                    f"total; last loss {values['loss']}). Parameters were left unchanged by "
                    "those steps; the last checkpoint is kept.")

    def summary(self) -> dict[str, float]:
        """Interval means (counters: their last value); resets the interval."""
        if not self.interval:
            return {}
        last = self.interval[-1]
        counters = ("nonfinite_steps", "consecutive_nonfinite")
        out = {name: (last[name] if name in counters else
                      float(np.mean([values[name] for values in self.interval])))
               for name in last}
        out["nonfinite"] = int(sum(values["nonfinite"] for values in self.interval))
        self.interval = []
        return out


def train_loop(*, model_factory: Callable[[], nnx.Module], loss_fn: LossFn,
               tx: optax.GradientTransformation, train_data: CheckpointableIterator,
               mesh: Mesh, config: LoopConfig | Mapping[str, Any] | Any,
               workdir: str | os.PathLike, eval_data: Callable[[], Iterable[Any]] | None = None,
               eval_stats: StatsFn | None = None,
               finalize: Callable[[Mapping[str, Mapping[str, jax.Array]]], Mapping[str, Any]]
               | None = None,
               rules: LogicalRules = DEFAULT_RULES,
               tokens_in: Callable[[Any], int] = count_tokens,
               log: Callable[[str], None] = _log,
               compiler_options: Mapping[str, Any] | None = None,
               init_params: Callable[[nnx.Module], Any] | None = None,
               learning_rate: Callable[[int], Any] | None = None) -> TrainResult:
    """Trains `model_factory()`'s model with `tx` on `train_data`, resuming from `workdir`.

    Args:
      model_factory: no-argument function building the `nnx.Module` (own `nnx.Rngs`).
      loss_fn: `(model, batch, rng) -> (loss, aux metrics)`.
      tx: the optax optimizer.
      train_data: iterator of this process's share of each global batch (pytrees of
        NumPy arrays, leading axis = examples) with `get_state` / `set_state`
        (JSON-serialisable state, or bytes).
      mesh: the `("data", "fsdp", "tensor")` mesh.
      config: a `LoopConfig` or a mapping of its fields.
      workdir: run directory (see the module doc).
      eval_data: returns a fresh iterable for one evaluation: `(stream, host batch)`
        pairs or host batches (see `evaluate`).
      eval_stats: `(model, batch, stream) -> sums` of one evaluation batch, run with
        `model.eval()` (e.g. a task's `eval_stats`); default `loss_stats(loss_fn)`.
      finalize: metrics from the totals of every stream (e.g. a task's `finalize`;
        its `loss` is the eval loss); default `finalize_mean`.
      rules: logical-axis rules.
      tokens_in: tokens in one host batch, for tokens/s (default `count_tokens`).
      log: receives one-line messages.
      compiler_options: XLA options of the train step (`cpu_compiler_options`).
      init_params: sets parameters of the initialised model in place when the run
        starts from scratch (`create_train_state`); not called when resuming.
      learning_rate: the optimizer's global rate by update count (0: the first
        update), e.g. `kexue.optim.learning_rate_schedule`; the record of step `s`
        logs `learning_rate(s − 1)`, the rate of its last update.

    Returns:
      A `TrainResult`; `preempted` is True if SIGTERM/SIGINT stopped the run after
      saving and before its last step (callers then exit with status 0).

    Raises:
      WorkdirError: the workdir is a file, not writable, or `checkpoints` is a file.
      WorkdirLockedError: another process trains in `workdir`.
      NonFiniteError: `max_consecutive_nonfinite` steps in a row were skipped.
      CheckpointMismatchError: `workdir` holds a checkpoint of another model
        (nothing in the workdir is changed).
      CheckpointSaveError: a checkpoint could not be written.
    """
    config = LoopConfig.from_settings(config)
    workdir = check_workdir(workdir, writable=True)
    abstract = abstract_train_state(model_factory, tx, mesh, rules, seed=config.seed)
    with WorkdirLock(workdir):
        check_resume(workdir, abstract)
        return _train(model_factory=model_factory, loss_fn=loss_fn, tx=tx,
                      train_data=train_data, mesh=mesh, config=config, workdir=workdir,
                      eval_data=eval_data, eval_stats=eval_stats, finalize=finalize,
                      rules=rules, tokens_in=tokens_in, log=log,
                      compiler_options=compiler_options, init_params=init_params,
                      learning_rate=learning_rate,
                      abstract=abstract)


def _train(*, model_factory, loss_fn, tx, train_data, mesh, config: LoopConfig, workdir: str,
           eval_data, eval_stats, finalize, rules, tokens_in, log, compiler_options,
           init_params, learning_rate, abstract) -> TrainResult:
    """`train_loop` once the workdir is locked and checked."""
    checkpoints = Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
        best_metric=config.best_metric, best_mode=config.best_mode,
        async_save=config.async_checkpointing, log=log)
    try:
        restored = checkpoints.restore_latest(abstract)
    except CheckpointMismatchError:
        checkpoints.close()
        raise
    if restored is None:
        state = create_train_state(model_factory, tx, mesh, rules, seed=config.seed,
                                   init_params=init_params)
    else:
        state = restored.state
        if restored.data_state is not None:
            train_data.set_state(restored.data_state)
    start = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, resume_step=start, tensorboard=config.tensorboard,
                          log=log)
    train_step = make_train_step(loss_fn, tx, abstract, mesh, rules=rules,
                                 grad_accum_steps=config.grad_accum_steps,
                                 compiler_options=compiler_options)
    eval_step = make_eval_step(eval_stats or loss_stats(loss_fn), abstract, mesh, rules=rules)
    finalize = finalize or finalize_mean
    bar = ProgressBar(config.num_steps, initial=start)
    tracker = _TrainMetrics(config.max_consecutive_nonfinite,
                            lambda step, values: writer.write(step, values, prefix="train"))
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    preempted = False
    step = start
    # Throughput counts training time only: `paused` collects the first step's
    # compilation, evaluations and checkpoint saves of the current log interval.
    tokens, steps_timed, paused = 0, 0, 0.0
    clock = time.perf_counter()
    started = clock

    def report(message: str) -> None:
        if log is _log:  # keep the progress bar intact
            bar.write(f"[kexue.train] {message}")
        else:
            log(message)

    checkpoints.log = report
    if start >= config.num_steps:
        log(f"already at step {start} of {config.num_steps}; nothing to train")
    try:
        with PreemptionGuard() as guard:
            while step < config.num_steps:
                host_batch = next(train_data)
                tokens += tokens_in(host_batch) * jax.process_count()
                dispatched = time.perf_counter()
                state, metrics = train_step(state, host_local_to_global(host_batch, mesh))
                if step == start:  # the first call compiles the step before dispatching it
                    compiled = time.perf_counter() - dispatched
                    paused += compiled
                    report(f"train step compiled in {format_duration(compiled)}")
                step += 1
                steps_timed += 1
                tracker.push(step, metrics)
                tracker.fetch(keep_last=True)
                last = step == config.num_steps
                if step % config.log_every == 0 or last:
                    tracker.fetch(keep_last=False)
                    now = time.perf_counter()
                    seconds = max(now - clock - paused, 1e-9)
                    train_metrics = tracker.summary()
                    if learning_rate is not None:
                        train_metrics["learning_rate"] = float(learning_rate(step - 1))
                    train_metrics["tokens_per_s"] = tokens / seconds
                    train_metrics["steps_per_s"] = steps_timed / seconds
                    tokens, steps_timed, paused, clock = 0, 0, 0.0, now
                    writer.write(step, train_metrics, prefix="train")
                    bar.update(step, **{"loss": train_metrics["loss"],
                                        "tokens/s": train_metrics["tokens_per_s"],
                                        "steps/s": train_metrics["steps_per_s"]})
                evaluated = None
                if eval_data is not None and (
                        last or (config.eval_every and step % config.eval_every == 0)):
                    tracker.fetch(keep_last=False)  # the steps so far count as training
                    began = time.perf_counter()
                    evaluated = eval_metrics = evaluate(eval_step, state, eval_data(), mesh,
                                                        finalize)
                    paused += time.perf_counter() - began
                    writer.write(step, eval_metrics, prefix="eval")
                    report(f"step {step} eval " + " ".join(
                        f"{name} {format_number(value)}" for name, value in eval_metrics.items()))
                stop = guard.should_stop(step)
                # A notice at the last step finishes the run normally (final metrics).
                preempted = stop and not last
                if stop or last or step % config.checkpoint_every == 0:
                    tracker.fetch(keep_last=False)
                    began = time.perf_counter()
                    checkpoints.save(state, data_state=train_data.get_state(),
                                     metrics=evaluated)
                    paused += time.perf_counter() - began
                checkpoints.poll()
                if preempted:
                    if tracker.interval:  # steps since the last record
                        writer.write(step, tracker.summary(), prefix="train")
                    report(f"received {guard.received}: finishing at step {step}")
                    break
            tracker.fetch(keep_last=False)
    except BaseException:
        # Pending saves are finalized even when stopping on an error; errors while
        # closing are logged and never replace the one that stopped the run.
        _close_all([bar.close, writer.close, checkpoints.close], log, failing=True)
        raise
    _close_all([bar.close, writer.close, checkpoints.close], log, failing=False)
    skipped = int(jax.device_get(state.nonfinite_steps))
    if preempted:
        log(f"preempted at step {step}; checkpoint saved, exiting cleanly")
    else:
        final_path = os.path.join(workdir, FINAL_METRICS)
        if step == start:  # nothing trained now: keep a complete record, else redo it
            try:
                read_final_metrics(workdir, require_eval=eval_data is not None)
                final_path = None
            except (OSError, WorkdirError) as problem:
                log(f"{FINAL_METRICS}: {str(problem).split(': rerun')[0]}; evaluating "
                    f"checkpoint step {step} to write it")
                train_metrics = _last_train_record(workdir, step)
                if eval_data is not None:
                    eval_metrics = evaluate(eval_step, state, eval_data(), mesh, finalize)
        if final_path is not None:
            write_json_atomic(final_path, {
                "step": step, "train": train_metrics, "eval": eval_metrics,
                "nonfinite_steps": skipped,
                "wall_time_s": round(time.perf_counter() - started, 3),
                "saved_steps": checkpoints.saved_steps,
            })
        if skipped:
            log(f"{skipped} of {step} steps were skipped as non-finite (see `nonfinite` in "
                "metrics.jsonl)")
    return TrainResult(state=state, step=step, preempted=preempted,
                       train_metrics=train_metrics, eval_metrics=eval_metrics,
                       saved_steps=list(checkpoints.saved_steps))
