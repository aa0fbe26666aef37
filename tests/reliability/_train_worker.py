"""One toy training run (`tests.train.toy`) in its own process, for the fault-injection tests.

Usage: python -m tests.reliability._train_worker WORKDIR [options]

Prints `BATCH i` (flushed) before fetching the batch of step `i + 1`, i.e. once steps
`1..i` are done and the checkpoint of step `i` (if any) was started, so a parent can
kill it at a chosen step. On return it writes the final parameters to
`WORKDIR/final_params.npz` and prints one `RESULT {json}` line.

`--fill-disk-at-step k` writes a filler file into `WORKDIR/checkpoints` until its
file system reports ENOSPC, before step `k + 1` runs (a disk that fills up under the
run); `--read-only-at-step k` remounts that file system read-only instead. Both need
`WORKDIR/checkpoints` to be a mount point of its own (a small tmpfs, see
`test_save_faults.py`). On `CheckpointSaveError` the worker restores the newest
checkpoint with a fresh `Checkpointer` and prints `RESTORED {json}`, exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from kexue.optim import parameter_path
from kexue.parallel import make_mesh
from kexue.train import (
    Checkpointer,
    CheckpointSaveError,
    LoopConfig,
    abstract_train_state,
    train_loop,
)
from tests.train import toy


class PacedBatches:
    """`toy.RegressionBatches` that announces each batch, sleeps, and can run a fault hook."""

    def __init__(self, inner: toy.RegressionBatches, *, sleep: float,
                 fault_at: int | None = None, fault: Any = None):
        self.inner, self.sleep, self.fault_at, self.fault = inner, sleep, fault_at, fault

    def get_state(self) -> dict[str, Any]:
        return self.inner.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.inner.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        print(f"BATCH {self.inner.index}", flush=True)
        if self.fault is not None and self.inner.index == self.fault_at:
            self.fault()
        if self.sleep:
            time.sleep(self.sleep)
        return next(self.inner)


def fill_disk(directory: str) -> None:
    """Writes `directory/filler` until the file system is full."""
    block = b"\0" * (64 * 1024)
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as file:
        try:
            while True:
                file.write(block)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    print("FAULT disk full", flush=True)


def remount_read_only(directory: str) -> None:
    subprocess.run(["mount", "-o", "remount,ro", directory], check=True)
    print("FAULT read-only", flush=True)


def params_table(params: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {parameter_path(path): np.asarray(leaf) for path, leaf in leaves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--sync", action="store_true", help="synchronous checkpoint saves")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--poison", type=int, nargs="*", default=[])
    parser.add_argument("--max-consecutive-nonfinite", type=int, default=10)
    faults = parser.add_mutually_exclusive_group()
    faults.add_argument("--fill-disk-at-step", type=int)
    faults.add_argument("--read-only-at-step", type=int)
    args = parser.parse_args(argv)

    fault_at, fault = None, None
    checkpoint_dir = os.path.join(args.workdir, "checkpoints")
    if args.fill_disk_at_step is not None:
        fault_at, fault = args.fill_disk_at_step, lambda: fill_disk(checkpoint_dir)
    elif args.read_only_at_step is not None:
        fault_at, fault = args.read_only_at_step, lambda: remount_read_only(checkpoint_dir)

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    data = PacedBatches(toy.RegressionBatches(8, poison=tuple(args.poison)),
                        sleep=args.step_sleep, fault_at=fault_at, fault=fault)
    config = LoopConfig(num_steps=args.steps, log_every=1, eval_every=0,
                        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
                        async_checkpointing=not args.sync, tensorboard=False,
                        max_consecutive_nonfinite=args.max_consecutive_nonfinite)
    try:
        result = train_loop(model_factory=toy.model_factory(), loss_fn=toy.loss_fn,
                            tx=toy.tx(), train_data=data, mesh=mesh, config=config,
                            workdir=args.workdir, eval_data=toy.eval_batches,
                            log=lambda message: print(message, flush=True))
    except CheckpointSaveError as error:
        print(f"ERROR CheckpointSaveError: {error}", flush=True)
        checkpoints = Checkpointer(checkpoint_dir,
                                   log=lambda message: print(message, flush=True))
        abstract = abstract_train_state(toy.model_factory(), toy.tx(), mesh)
        restored = checkpoints.restore_latest(abstract)
        print("RESTORED " + json.dumps({
            "step": restored.step, "data_state": restored.data_state,
            "steps_on_disk": checkpoints.all_steps(),
            "params_finite": all(bool(np.isfinite(v).all())
                                 for v in params_table(restored.state.params).values()),
        }), flush=True)
        return 2
    np.savez(os.path.join(args.workdir, "final_params.npz"), **params_table(result.state.params))
    print("RESULT " + json.dumps({"step": result.step, "saved_steps": result.saved_steps,
                                  "preempted": result.preempted}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
