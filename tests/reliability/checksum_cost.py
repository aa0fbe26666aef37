"""What checkpoint checksums cost: save and restore times of the lm_stdlib model with and
without them, interleaved, medians.

    python -m tests.reliability.checksum_cost --repeats 9

Builds the `configs/lm_stdlib.py` model (full size, byte vocabulary) with its Amos
optimizer state, then alternates, `--repeats` times (the order within a round
alternates too): a synchronous save with checksums (`Checkpointer(checksums=True)`:
hash every array on the devices, then write) and one without; a read-only restore
with verification and one without (onto the same abstract state, arrays ready).
Round 0 compiles the checksum function and is reported apart from the medians. Each
time is reported as wall time and as the CPU time of the process (all its threads),
which a machine shared with other jobs disturbs less. Last,
the checksum computation alone (`state_checksums` of the whole state, compiled): its
median over the same number of calls, the part of the save and restore cost that does
not depend on the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from experiments import config as experiment_config
from experiments import run as experiment_run
from kexue import models
from kexue.train import (
    Checkpointer,
    abstract_train_state,
    create_train_state,
    state_checksums,
)


def _lm_stdlib():
    """The lm_stdlib model (byte vocabulary) and its optimizer, without the data."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs", "lm_stdlib.py")
    config = experiment_config.load(path)
    spec = models.ModelSpec.from_settings({**config.model.to_dict(), "vocab_size": 261})
    return config, spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    config, spec = _lm_stdlib()
    mesh = experiment_run.mesh_from(config)
    from flax import nnx

    def model_factory():
        return models.build_model(spec, rngs=nnx.Rngs(0))

    tx = experiment_run.optimizer(config, model_factory, int(config.train.num_steps))
    state = create_train_state(model_factory, tx, mesh)
    abstract = abstract_train_state(model_factory, tx, mesh)
    leaves = jax.tree.leaves(state)
    size = sum(np.asarray(leaf).nbytes for leaf in leaves
               if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))
    print(f"state: {len(leaves)} arrays, {size / 2**20:.1f} MiB; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")
    root = tempfile.mkdtemp(prefix="checksum_cost_")
    times: dict[tuple[str, bool], list[tuple[float, float]]] = {
        (kind, on): [] for kind in ("save", "restore") for on in (True, False)}
    try:
        for round_index in range(args.repeats + 1):
            order = (True, False) if round_index % 2 else (False, True)
            for on in order:
                directory = os.path.join(root, f"{'on' if on else 'off'}-{round_index}")
                writer = Checkpointer(directory, async_save=False, checksums=on,
                                      log=lambda message: None)
                started, cpu = time.perf_counter(), time.process_time()
                writer.save(state)
                writer.wait()
                saved = (time.perf_counter() - started, time.process_time() - cpu)
                writer.close()
                reader = Checkpointer(directory, read_only=True, checksums=on,
                                      log=lambda message: None)
                started, cpu = time.perf_counter(), time.process_time()
                restored = reader.restore(0, abstract)
                jax.block_until_ready(jax.tree.leaves(restored.state))
                loaded = (time.perf_counter() - started, time.process_time() - cpu)
                reader.close()
                shutil.rmtree(directory)
                if round_index == 0:
                    print(f"round 0 (compiles the checksum function when on): checksums "
                          f"{'on ' if on else 'off'} save {saved[0]:.3f} s, restore "
                          f"{loaded[0]:.3f} s (wall)")
                    continue
                times[("save", on)].append(saved)
                times[("restore", on)].append(loaded)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"medians over {args.repeats} interleaved rounds:")
    for kind in ("save", "restore"):
        for column, clock in ((0, "wall"), (1, "CPU ")):
            on = np.median([t[column] for t in times[(kind, True)]])
            off = np.median([t[column] for t in times[(kind, False)]])
            print(f"  {kind:7s} {clock} with checksums {on:.3f} s, without {off:.3f} s: "
                  f"{on - off:+.3f} s ({(on / off - 1) * 100:+.0f}%)")
    alone = []
    for _ in range(args.repeats):
        started, cpu = time.perf_counter(), time.process_time()
        state_checksums(state)
        alone.append((time.perf_counter() - started, time.process_time() - cpu))
    wall, cpu = (np.median([t[column] for t in alone]) * 1e3 for column in (0, 1))
    print(f"  checksums of the whole state alone: median {wall:.0f} ms wall, {cpu:.0f} ms CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
