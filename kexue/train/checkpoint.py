"""Orbax checkpoints of a `TrainState` and the data iterator, safe to kill at any time.

    checkpoints = Checkpointer(workdir / "checkpoints", keep=3, best_metric="loss")
    restored = checkpoints.restore_latest(abstract_state)   # None on a fresh workdir
    ...
    checkpoints.save(state, data_state=iterator.get_state(), metrics=eval_metrics)
    checkpoints.poll()          # reports saves that have been finalized
    checkpoints.close()         # waits for the last save, then reports it

Each checkpoint is one step directory of an `ocp.CheckpointManager` with three items:
`state` (the `TrainState` arrays: params, model state, optimizer state, step, PRNG
key, non-finite counters; `StandardSave`, tensorstore/OCDBT), `data` (every
process's data-iterator state, JSON) and `meta` (step, layout, the metrics saved with
it and the `best_metric` / `best_mode` ranking them, JSON). Nothing is
pickled and restoring never runs code from the checkpoint.

Saves are asynchronous: `save` returns once the arrays are copied off the devices,
and a step is *reported* saved (`log`, `saved_steps`) only after Orbax has
finalized it (written and atomically renamed), so no step reported as saved can be
lost to a kill. Half-written saves live in temporary directories that Orbax
ignores.

Kept: the last `keep` steps, plus the `keep_best` best by `best_metric` among steps
saved with metrics.

`restore_latest` restores onto the shardings of the abstract state given (any mesh
shape). A checkpoint whose arrays or metadata cannot be read is reported and the
previous one is tried; once one restores, the unreadable newer ones are moved to
`<directory>/../corrupt_checkpoints/<step>-<time>`. A
checkpoint of a different model (parameter paths or shapes differ) raises
`CheckpointMismatchError` listing the differences.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from kexue.optim import parameter_path
from kexue.train.state import TrainState

__all__ = [
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "Checkpointer",
    "Restored",
]

_FORMAT_VERSION = 1
_STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng", "nonfinite_steps",
                 "consecutive_nonfinite")


class CheckpointMismatchError(ValueError):
    """The checkpoint holds a different model or optimizer: paths or shapes differ."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full, workdir not writable)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore_latest` found.

    Attributes:
      state: the `TrainState`, laid out with the abstract state's shardings.
      data_state: this process's data-iterator state (None if none was saved or the
        process count changed).
      step: the checkpoint's step.
      skipped: `(step, reason)` for every newer checkpoint that could not be read.
    """

    state: TrainState
    data_state: Any
    step: int
    skipped: tuple[tuple[int, str], ...] = ()


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _STATE_FIELDS}


def _encode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, bytes | bytearray):
        return {"__base64__": base64.b64encode(bytes(data_state)).decode("ascii")}
    return data_state


def _decode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, Mapping) and set(data_state) == {"__base64__"}:
        return base64.b64decode(data_state["__base64__"])
    return data_state


def _gather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (a collective)."""
    encoded = json.dumps(value).encode("utf-8")
    if jax.process_count() == 1:
        return [json.loads(encoded)]
    lengths = multihost_utils.process_allgather(np.array([len(encoded)], np.int64))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(length)]).decode("utf-8"))
            for row, length in zip(gathered, np.ravel(lengths), strict=True)]


def _stored_shape(leaf: Any) -> tuple[int, ...]:
    """The shape as stored: a typed PRNG key is stored as its key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _leaf_table(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {parameter_path(path): _stored_shape(leaf) for path, leaf in leaves}


def _describe_mismatch(saved: Mapping[str, tuple[int, ...]],
                       wanted: Mapping[str, tuple[int, ...]], limit: int = 20) -> str | None:
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    reshaped = sorted(path for path in set(saved) & set(wanted) if saved[path] != wanted[path])
    if not (missing or unexpected or reshaped):
        return None
    lines = []

    def section(title: str, rows: Sequence[str]) -> None:
        if rows:
            lines.append(f"  {title} ({len(rows)}):")
            lines.extend(f"    {row}" for row in rows[:limit])
            if len(rows) > limit:
                lines.append(f"    ... and {len(rows) - limit} more")

    section("shape differs (checkpoint vs model)",
            [f"{path}: {saved[path]} vs {wanted[path]}" for path in reshaped])
    section("in the model but not in the checkpoint",
            [f"{path}: {wanted[path]}" for path in missing])
    section("in the checkpoint but not in the model",
            [f"{path}: {saved[path]}" for path in unexpected])
    return "\n".join(lines)


def _default_log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[kexue.train] {message}", flush=True)


class Checkpointer:
    """Saves and restores `TrainState`s with an Orbax `CheckpointManager` (module doc).

    Args:
      directory: where step directories go (created if missing).
      keep: number of most recent checkpoints kept.
      best_metric: name of a metric passed to `save(metrics=...)`; the `keep_best`
        best steps by it are kept too. None keeps only the latest.
      best_mode: "min" or "max": which values of `best_metric` are better.
      keep_best: number of best checkpoints kept.
      async_save: write in a background thread (True) or before `save` returns.
      log: receives one-line messages (saved, skipped corrupt checkpoints).

    Attributes:
      saved_steps: steps this object saved and saw finalized, in order.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "min", keep_best: int = 1,
                 async_save: bool = True, log: Callable[[str], None] = _default_log):
        if keep < 1:
            raise ValueError(f"`keep` must be at least 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.log = log
        self.saved_steps: list[int] = []
        self._pending: list[int] = []
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric is not None:
            sign = 1.0 if best_mode == "max" else -1.0
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: sign * float(metrics[best_metric]),
                n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    # -- saving ---------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, *, data_state: Any = None,
             metrics: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state` at its step; False if that step is already saved.

        Every process must call it (it is a collective). `data_state` is this
        process's data-iterator state (JSON-serialisable dict, or bytes).
        """
        step = int(jax.device_get(state.step))
        # Orbax's `save` first waits for the previous save and re-raises its error; wait
        # here so that error names the step that failed, not this one, and is never
        # followed by a report of that step as saved.
        self.wait()
        data_states = _gather_json(_encode_data_state(data_state))
        if step in self._manager.all_steps():
            return False
        metrics = None if metrics is None else {
            name: float(value) for name, value in metrics.items()}
        # The metrics and the ranking go into `meta` as well: readers pick the best step
        # from the files alone (`kexue.saved.resolve_step`).
        meta = {"format": _FORMAT_VERSION, "step": step, "process_count": jax.process_count(),
                "time": time.time(), "metrics": metrics, "best_metric": self.best_metric,
                "best_mode": self.best_mode}
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                data=ocp.args.JsonSave({"processes": data_states}),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
        except Exception as error:
            raise self._save_error(step, error) from error
        self._pending.append(step)
        return True

    def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
        try:
            intact: Any = [s for s in self.all_steps() if s != step]
        except Exception:  # the directory itself may be unreadable
            intact = "unknown"
        return CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed: "
            f"{type(error).__name__}: {error}. Earlier checkpoints are untouched "
            f"(finalized steps: {intact or 'none'}).")

    def _report_finished(self) -> list[int]:
        finished, self._pending = self._pending, []
        for step in finished:
            self.saved_steps.append(step)
            self.log(f"checkpoint saved: step {step} ({self.directory}/{step})")
        return finished

    def poll(self) -> list[int]:
        """Reports (and returns) the steps whose saves have been finalized since last call."""
        if not self._pending or self._manager.is_saving_in_progress():
            return []
        return self.wait()

    def wait(self) -> list[int]:
        """Blocks until pending saves are finalized; reports and returns their steps.

        Raises:
          CheckpointSaveError: a background save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            step = self._pending[-1] if self._pending else -1
            self._pending = []
            raise self._save_error(step, error) from error
        return self._report_finished()

    def close(self) -> None:
        """Waits for pending saves, reports them and releases the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()

    # -- restoring ------------------------------------------------------------------

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
            os.makedirs(target, exist_ok=True)
            destination = os.path.join(target, f"{step}-{int(time.time())}")
            shutil.move(os.path.join(self.directory, str(step)), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kexue_quarantine_{step}")
        self._manager.reload()

    def check_compatible(self, step: int, abstract_state: TrainState) -> None:
        """Raises `CheckpointMismatchError` if `step` holds other paths or shapes.

        Other errors (unreadable metadata) propagate.
        """
        saved = _leaf_table(self._manager.item_metadata(step)["state"])
        problem = _describe_mismatch(saved, _leaf_table(_state_tree(abstract_state)))
        if problem:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit the model and optimizer "
                f"being trained (another model config or optimizer?):\n{problem}\n"
                "Use a fresh --workdir, or the config the checkpoint was written with.")

    def restore(self, step: int, abstract_state: TrainState) -> Restored:
        """Restores checkpoint `step` onto the shardings of `abstract_state`."""
        self.check_compatible(step, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_state_tree(abstract_state)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state = abstract_state.replace(**restored["state"])
        data_states = (restored["data"] or {}).get("processes") or []
        data_state = None
        if len(data_states) == jax.process_count():
            data_state = _decode_data_state(data_states[jax.process_index()])
        elif data_states:
            self.log(f"checkpoint step {step} holds data-iterator states of "
                     f"{len(data_states)} processes, this run has {jax.process_count()}: "
                     "the data iterators start afresh")
        return Restored(state=state, data_state=data_state, step=step)

    def restore_latest(self, abstract_state: TrainState) -> Restored | None:
        """The newest readable checkpoint restored onto `abstract_state`'s shardings.

        Checkpoints that fail to restore (truncated or missing files) are reported
        through `log` and the previous one is tried. Once an older one restores, the
        newer failed ones are known to be damaged (the same target restored fine) and
        are moved to `corrupt_checkpoints/`, so new saves can take their steps.
        Returns None when there is no checkpoint.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint holds other
            parameter paths or shapes.
          RuntimeError: no checkpoint could be restored; every reason is listed and
            nothing is moved (the fault may lie with this run, not the files).
        """
        skipped: list[tuple[int, str]] = []
        self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # any read failure: try the previous checkpoint
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                self.log(f"checkpoint step {step} in {self.directory} could not be restored "
                         f"(corrupt or incomplete? {reason}); trying the previous one")
                skipped.append((step, reason))
                continue
            for bad_step, _ in skipped:
                self._quarantine(bad_step)
            moved = (f"; moved corrupt steps {[s for s, _ in skipped]} to "
                     f"{os.path.dirname(self.directory)}/corrupt_checkpoints" if skipped else "")
            self.log(f"restored checkpoint step {step} from {self.directory}{moved}")
            return dataclasses.replace(restored, skipped=tuple(skipped))
        if skipped:
            reasons = "\n".join(f"  step {step}: {reason}" for step, reason in skipped)
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n"
                               f"{reasons}\nNothing was moved or deleted; fix the cause or "
                               "use a fresh workdir.")
        return None
