"""One process of a two-process toy training job (`test_two_process.py`).

Usage: python -m tests.reliability._two_process_worker HOST:PORT NUM_PROCESSES PROCESS_ID
           WORKDIR [--steps N] [--step-sleep S] [--heartbeat-timeout S]

With NUM_PROCESSES > 1 the processes join through `jax.distributed.initialize` with
gloo CPU collectives and a short heartbeat timeout, so the survivors of a dead
process notice within seconds. Every process owns one CPU device; the mesh is
`data = NUM_PROCESSES` and each process feeds its rows of the global batch of
`toy.RegressionBatches(8)`. With NUM_PROCESSES = 1 the same global batch runs on one
process with two devices (`data = 2`), for comparison. Prints `BATCH i` before each
step and, at the end, writes `final_params.npz` (process 0) and prints `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

GLOBAL_BATCH = 8


class ProcessShare:
    """This process's rows of each global toy batch; the state is the global batch index."""

    def __init__(self, process_id: int, num_processes: int, sleep: float):
        from tests.train import toy

        self.inner = toy.RegressionBatches(GLOBAL_BATCH)
        rows = GLOBAL_BATCH // num_processes
        self.rows = slice(process_id * rows, (process_id + 1) * rows)
        self.sleep = sleep

    def get_state(self) -> dict[str, Any]:
        return self.inner.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.inner.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        print(f"BATCH {self.inner.index}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)
        return {name: value[self.rows] for name, value in next(self.inner).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("coordinator")
    parser.add_argument("num_processes", type=int)
    parser.add_argument("process_id", type=int)
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--heartbeat-timeout", type=int, default=5)
    args = parser.parse_args(argv)

    import jax

    from kexue.parallel import initialize_distributed

    if args.num_processes > 1:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                               cpu_collectives="gloo",
                               heartbeat_timeout_seconds=args.heartbeat_timeout)

    from kexue.optim import parameter_path
    from kexue.parallel import make_mesh
    from kexue.train import LoopConfig, train_loop
    from tests.train import toy

    mesh = make_mesh(data=2 if args.num_processes == 1 else args.num_processes, fsdp=1,
                     tensor=1, devices=jax.devices()[:max(2, args.num_processes)])
    config = LoopConfig(num_steps=args.steps, log_every=1, checkpoint_every=3,
                        tensorboard=False)
    result = train_loop(model_factory=toy.model_factory(), loss_fn=toy.loss_fn, tx=toy.tx(),
                        train_data=ProcessShare(jax.process_index(), args.num_processes,
                                                args.step_sleep),
                        mesh=mesh, config=config, workdir=args.workdir,
                        log=lambda message: print(message, flush=True))
    params = {parameter_path(path): np.asarray(jax.device_get(leaf)) for path, leaf in
              jax.tree_util.tree_flatten_with_path(
                  jax.experimental.multihost_utils.process_allgather(result.state.params,
                                                                     tiled=True))[0]}
    if jax.process_index() == 0:
        np.savez(os.path.join(args.workdir, "final_params.npz"), **params)
    print("RESULT " + json.dumps({"process": jax.process_index(), "step": result.step,
                                  "saved_steps": result.saved_steps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
