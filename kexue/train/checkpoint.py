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

Every array is checksummed at save and verified at restore: `meta` holds, per array
path, a 64-bit hash of the global array's bits: with `h_i = fmix32(w_i ^ (i·c + s))`
over the array's 32-bit words `w_i` in row-major order (`fmix32` the MurmurHash3
finalizer), the two 32-bit lanes `Σ h_i` and `Σ (2i + 1)·h_i` mod 2^32. A sum does
not depend on the order of its terms, so it is computed on the devices inside
`jax.jit` over the sharded global array, and every
process of a multi-process job gets the same replicated value whatever the mesh; a
restore onto another mesh verifies the same numbers. One changed word always changes
the hash (`fmix32` is a bijection); a random multi-word corruption goes unnoticed with
probability about 2^-64. The data-iterator states are covered by a SHA-256 of their
JSON. A state whose parameters or model state hold NaN/Inf is never saved
(`CheckpointSaveError` naming the paths).

`restore_latest` restores onto the shardings of the abstract state given (any mesh
shape). A checkpoint whose arrays or metadata cannot be read, or whose arrays do not
match their checksums, is reported and the previous one is tried; once one restores,
the unreadable newer ones are moved to `<directory>/../corrupt_checkpoints/<step>-<time>`.
A checkpoint of a different model (parameter paths or shapes differ) raises
`CheckpointMismatchError` listing the differences.

`Checkpointer(directory, read_only=True)` is a reader (`experiments.evaluate`, and any
tool that loads a run's parameters): it creates, moves and deletes nothing, takes no
lock, and works while a trainer writes the directory: a step that is half-written is
not listed yet (Orbax finalizes a step by renaming its temporary directory), and a step
that the trainer deletes while it is read, or that does not match its checksums, is
skipped (reported through `log`) and the previous one is tried.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from kexue.optim import parameter_path
from kexue.train.state import TrainState

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "Checkpointer",
    "Restored",
    "state_checksums",
]

# 2: `meta` holds `checksums` (per array path) and `data_sha256`; 1: neither.
_FORMAT_VERSION = 2
_STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng", "nonfinite_steps",
                 "consecutive_nonfinite")


class CheckpointMismatchError(ValueError):
    """The checkpoint holds a different model or optimizer: paths or shapes differ."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full, workdir not writable)."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint's arrays or data state differ from the checksums saved with them."""


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


_MIX, _SEED = 0x9E3779B9, 0x243F6A88  # c and s of the module doc


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(leaf: jax.Array) -> jax.Array:
    """The bits of `leaf` as uint32 words, same shape (8-byte items: a trailing axis of 2)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        leaf = jnp.stack([leaf.real, leaf.imag], axis=-1)
    if leaf.dtype == jnp.bool_:
        leaf = leaf.astype(jnp.uint8)
    size = leaf.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


def _leaf_checksum(leaf: jax.Array) -> jax.Array:
    """uint32 `[2]`: `Σ h_i` and `Σ (2i + 1)·h_i` mod 2^32 (module doc)."""
    words = _words(leaf)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the row-major index, without reshaping
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
            stride % 2**32)
        stride *= words.shape[axis]
    hashed = _fmix32(words ^ (index * np.uint32(_MIX) + np.uint32(_SEED)))
    return jnp.stack([jnp.sum(hashed, dtype=jnp.uint32),
                      jnp.sum(hashed * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)])


def _inexact_leaves_finite(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf))
                        if jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.array(True), tree)


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(mesh: Any) -> Callable[[Any], Any]:
    """Jitted `tree -> (checksums, finite)`, outputs replicated on `mesh` (if any)."""

    def fingerprint(tree: Mapping[str, Any]) -> tuple[Any, Any]:
        finite = {name: _inexact_leaves_finite(tree[name])
                  for name in ("params", "model_state") if name in tree}
        return jax.tree.map(_leaf_checksum, tree), finite

    if mesh is None:
        return jax.jit(fingerprint)
    return jax.jit(fingerprint, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _fingerprint(tree: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(`{array path: 16 hex digits}`, paths of non-finite params/model-state arrays)."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
              if isinstance(getattr(leaf, "sharding", None), NamedSharding)}
    sums, finite = _fingerprint_fn(meshes.pop() if len(meshes) == 1 else None)(tree)

    def fetch(x: jax.Array) -> np.ndarray:
        return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)

    checksums = {parameter_path(path): "".join(f"{int(v):08x}" for v in fetch(leaf))
                 for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]}
    bad = [parameter_path(path) for path, leaf in jax.tree_util.tree_flatten_with_path(finite)[0]
           if not bool(fetch(leaf))]
    return checksums, bad


def state_checksums(state: TrainState) -> dict[str, str]:
    """`{array path: 16 hex digits}` of a state, as saved in a checkpoint's `meta`.

    The same for any sharding of the same values (see the module doc); every process
    gets the same dict.
    """
    return _fingerprint(_state_tree(state))[0]


def checksum_mismatches(tree: Mapping[str, Any], expected: Mapping[str, str]) -> list[str]:
    """Array paths where `tree` disagrees with a checkpoint's saved checksums.

    Args:
      tree: some items of a saved state, e.g. `{"params": ..., "model_state": ...}`
        restored from a checkpoint (a reader that needs only the parameters).
      expected: the checkpoint's `meta["checksums"]` (`state_checksums` at save time).

    Returns:
      Sorted paths whose checksum differs, or that one side lacks, under the items of
      `tree` (items `tree` does not hold are not compared).
    """
    actual = _fingerprint(tree)[0]
    items = tuple(f"{name}/" for name in tree)
    wanted = {path: value for path, value in expected.items()
              if path.startswith(items) or path in tree}
    return sorted(path for path in set(wanted) | set(actual)
                  if wanted.get(path) != actual.get(path))


def _data_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class Checkpointer:
    """Saves and restores `TrainState`s with an Orbax `CheckpointManager` (module doc).

    Args:
      directory: where step directories go (created if missing, unless `read_only`).
      keep: number of most recent checkpoints kept.
      best_metric: name of a metric passed to `save(metrics=...)`; the `keep_best`
        best steps by it are kept too. None keeps only the latest.
      best_mode: "min" or "max": which values of `best_metric` are better.
      keep_best: number of best checkpoints kept.
      async_save: write in a background thread (True) or before `save` returns.
      log: receives one-line messages (saved, skipped corrupt checkpoints).
      read_only: a reader: `save` is refused, nothing in `directory` is created,
        moved or deleted, and checkpoints that cannot be read (or vanish while a
        trainer deletes them) are skipped (module doc).
      checksums: write checksums at save and verify them at restore (checkpoints
        saved without them restore unverified either way).

    Attributes:
      saved_steps: steps this object saved and saw finalized, in order.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "min", keep_best: int = 1,
                 async_save: bool = True, log: Callable[[str], None] = _default_log,
                 read_only: bool = False, checksums: bool = True):
        if keep < 1:
            raise ValueError(f"`keep` must be at least 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.log = log
        self.read_only = read_only
        self.checksums = checksums
        self.saved_steps: list[int] = []
        self._pending: list[int] = []
        self._handlers = {"state": ocp.StandardCheckpointHandler(),
                          "data": ocp.JsonCheckpointHandler(),
                          "meta": ocp.JsonCheckpointHandler()}
        if read_only:
            # No CheckpointManager: its start-up creates the directory and removes the
            # temporary directories of saves in flight (a running trainer's).
            self._manager = None
            self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**self._handlers))
            return
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric is not None:
            sign = 1.0 if best_mode == "max" else -1.0
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: sign * float(metrics[best_metric]),
                n=keep_best, keep_checkpoints_without_metrics=False))
        # The workdir lock (`kexue.train.WorkdirLock`) makes this the only writer, so
        # the temporary directories found at start are this run's own leftovers.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=self._handlers)

    # -- saving ---------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, ascending."""
        if self._manager is not None:
            return sorted(self._manager.all_steps())
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        # Finalized steps are directories named by the step; saves in flight live in
        # `<step>.orbax-checkpoint-tmp-*` until renamed.
        return sorted(int(name) for name in names
                      if name.isdigit() and os.path.isdir(os.path.join(self.directory, name)))

    def save(self, state: TrainState, *, data_state: Any = None,
             metrics: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state` at its step; False if that step is already saved.

        Every process must call it (it is a collective). `data_state` is this
        process's data-iterator state (JSON-serialisable dict, or bytes).

        Raises:
          CheckpointSaveError: the write failed, an earlier background write failed,
            or the parameters or model state hold NaN/Inf (nothing is written).
        """
        if self._manager is None:
            raise CheckpointSaveError(f"{self.directory} was opened read-only: not saving")
        step = int(jax.device_get(state.step))
        # Orbax's `save` first waits for the previous save and re-raises its error; wait
        # here so that error names the step that failed, not this one, and is never
        # followed by a report of that step as saved.
        self.wait()
        data_states = _gather_json(_encode_data_state(data_state))
        if step in self._manager.all_steps():
            return False
        tree = _state_tree(state)
        checksums, nonfinite = _fingerprint(tree)
        if nonfinite:
            raise CheckpointSaveError(
                f"not saving checkpoint step {step}: NaN/Inf in {len(nonfinite)} arrays "
                f"({', '.join(nonfinite[:5])}{', ...' if len(nonfinite) > 5 else ''}). "
                f"Earlier checkpoints are untouched (finalized steps: "
                f"{self.all_steps() or 'none'}).")
        data = {"processes": data_states}
        metrics = None if metrics is None else {
            name: float(value) for name, value in metrics.items()}
        # The metrics and the ranking go into `meta` as well: readers pick the best step
        # from the files alone (`kexue.saved.resolve_step`).
        meta = {"format": _FORMAT_VERSION, "step": step, "process_count": jax.process_count(),
                "time": time.time(), "metrics": metrics, "best_metric": self.best_metric,
                "best_mode": self.best_mode}
        if self.checksums:
            meta.update(checksums=checksums, data_sha256=_data_digest(data))
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data),
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
            f"{_save_reason(error)}. Earlier checkpoints are untouched "
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
        if self._manager is None:
            return []
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            step = self._pending[-1] if self._pending else -1
            self._pending = []
            raise self._save_error(step, error) from error
        return self._report_finished()

    def close(self) -> None:
        """Waits for pending saves, reports them and releases the manager (or reader)."""
        if self._manager is None:
            self._reader.close()
            return
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

    def _item_metadata(self, step: int) -> Any:
        if self._manager is not None:
            return self._manager.item_metadata(step)["state"]
        metadata = self._reader.metadata(os.path.join(self.directory, str(step)))
        return metadata.item_metadata["state"]

    def check_compatible(self, step: int, abstract_state: TrainState) -> None:
        """Raises `CheckpointMismatchError` if `step` holds other paths or shapes.

        Other errors (unreadable metadata) propagate.
        """
        saved = _leaf_table(self._item_metadata(step))
        problem = _describe_mismatch(saved, _leaf_table(_state_tree(abstract_state)))
        if problem:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit the model and optimizer "
                f"being trained (another model config or optimizer?):\n{problem}\n"
                "Use a fresh --workdir, or the config the checkpoint was written with.")

    def check_latest_compatible(self, abstract_state: TrainState) -> int | None:
        """The newest step whose metadata reads, after checking it fits `abstract_state`.

        Reads only metadata and writes nothing, so a trainer can refuse a workdir of
        another model before it changes anything there. None: no readable checkpoint.

        Raises:
          CheckpointMismatchError: that checkpoint holds other paths or shapes.
        """
        for step in reversed(self.all_steps()):
            try:
                self.check_compatible(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception:  # unreadable: `restore_latest` reports and skips it
                continue
            return step
        return None

    def _verify(self, step: int, tree: Any, data: Any, meta: Mapping[str, Any]) -> None:
        expected = meta.get("checksums")
        if not self.checksums:
            return
        if expected is None:
            self.log(f"checkpoint step {step} has no checksums (format {meta.get('format')}): "
                     "restored unverified")
            return
        differ = checksum_mismatches(tree, expected)
        if differ:
            raise CheckpointCorruptError(
                f"checkpoint {self.directory}/{step}: "
                f"{f'{len(differ)} arrays differ' if len(differ) > 1 else '1 array differs'} "
                f"from the checksums saved at save time ({', '.join(differ[:5])}"
                f"{', ...' if len(differ) > 5 else ''}): the files changed after saving "
                "(disk, copy or transfer error)")
        if meta.get("data_sha256") not in (None, _data_digest(data)):
            raise CheckpointCorruptError(
                f"checkpoint {self.directory}/{step}: the data-iterator state differs from "
                "the checksum saved with it")

    def restore(self, step: int, abstract_state: TrainState) -> Restored:
        """Restores checkpoint `step` onto the shardings of `abstract_state`.

        Raises:
          CheckpointMismatchError: other parameter paths or shapes.
          CheckpointCorruptError: the arrays or data state differ from their checksums.
        """
        self.check_compatible(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_state_tree(abstract_state)),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        if self._manager is not None:
            restored = self._manager.restore(step, args=args)
        else:
            restored = self._reader.restore(os.path.join(self.directory, str(step)), args=args)
        data = restored["data"] or {}
        self._verify(step, restored["state"], data, restored["meta"] or {})
        state = abstract_state.replace(**restored["state"])
        data_states = data.get("processes") or []
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

        Checkpoints that fail to restore (truncated or missing files, checksum
        mismatch) are reported through `log` and the previous one is tried. Once an
        older one restores, the newer failed ones are known to be damaged (the same
        target restored fine) and a writer moves them to `corrupt_checkpoints/`, so new
        saves can take their steps; a reader leaves them. A reader also lists the
        steps again when one vanished while it was read (a trainer deleted it).
        Returns None when there is no checkpoint.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint holds other
            parameter paths or shapes.
          CheckpointCorruptError: no checkpoint could be restored; every reason is
            listed and nothing is moved (the fault may lie with this run, not the files).
        """
        if self._manager is not None:
            self._manager.reload()
        rounds = 1 if self._manager is not None else 3
        skipped: list[tuple[int, str]] = []
        for _ in range(rounds):
            skipped, vanished = [], False
            for step in reversed(self.all_steps()):
                try:
                    restored = self.restore(step, abstract_state)
                except CheckpointMismatchError:
                    raise
                except Exception as error:  # any read failure: try the previous checkpoint
                    if self._manager is None and not os.path.isdir(
                            os.path.join(self.directory, str(step))):
                        self.log(f"checkpoint step {step} in {self.directory} was removed "
                                 "while being read (a trainer is running); trying the "
                                 "previous one")
                        vanished = True
                        continue
                    reason = _first_line(error)
                    self.log(f"checkpoint step {step} in {self.directory} could not be "
                             f"restored (corrupt or incomplete? {reason}); trying the "
                             "previous one")
                    skipped.append((step, reason))
                    continue
                moved = ""
                if skipped and self._manager is not None:
                    for bad_step, _ in skipped:
                        self._quarantine(bad_step)
                    moved = (f"; moved corrupt steps {[s for s, _ in skipped]} to "
                             f"{os.path.dirname(self.directory)}/corrupt_checkpoints")
                self.log(f"restored checkpoint step {step} from {self.directory}{moved}")
                return dataclasses.replace(restored, skipped=tuple(skipped))
            if not vanished:
                break
        if skipped:
            reasons = "\n".join(f"  step {step}: {reason}" for step, reason in skipped)
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} could be restored:\n{reasons}\nNothing "
                "was moved or deleted; fix the cause or use a fresh workdir.")
        return None


def _save_reason(error: BaseException) -> str:
    """One line: the OS error behind a failed save (Orbax and TensorStore wrap it in long
    messages), then the first line of the error raised."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        code = link.errno if isinstance(link, OSError) and link.errno else None
        found = re.search(r"\[Errno (\d+)\]|os_error_code='(\d+)'", str(link))
        if code is None and found:
            code = int(found.group(1) or found.group(2))
        if code:
            return f"{os.strerror(code)} (errno {code}; {_first_line(chain[0])[:200]})"
    return _first_line(chain[0])
