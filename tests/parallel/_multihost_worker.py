"""One process of the two-process CPU job in `test_distributed.py` (run as a script).

Usage: python _multihost_worker.py HOST:PORT NUM_PROCESSES PROCESS_ID

Each process owns 2 CPU devices (set through XLA_FLAGS by the test) and the rows
`[2 * PROCESS_ID, 2 * PROCESS_ID + 2)` of the global matrix `arange(12).reshape(4, 3)`.
It prints one JSON line with what it computed over the 4 global devices.
"""

from __future__ import annotations

import json
import sys

import numpy as np

GLOBAL_ROWS, COLS = 4, 3


def main(coordinator_address: str, num_processes: int, process_id: int) -> None:
    from kexue.parallel import host_local_to_global, initialize_distributed, make_mesh

    info = initialize_distributed(coordinator_address, num_processes, process_id)
    again = initialize_distributed(coordinator_address, num_processes, process_id)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = make_mesh(data=-1, fsdp=2)  # 4 devices: data 2 (one per process) × fsdp 2
    rows_per_process = GLOBAL_ROWS // num_processes
    everything = np.arange(GLOBAL_ROWS * COLS, dtype=np.float32).reshape(GLOBAL_ROWS, COLS)
    mine = everything[process_id * rows_per_process:(process_id + 1) * rows_per_process]
    x = host_local_to_global(mine, mesh)  # batch rule: rows over ("data", "fsdp")

    replicated = NamedSharding(mesh, PartitionSpec())
    total = jax.jit(jnp.sum, out_shardings=replicated)(x)
    batch_axes = ("data", "fsdp")
    psum = jax.jit(
        jax.shard_map(
            lambda block: jax.lax.psum(jnp.sum(block), batch_axes),
            mesh=mesh,
            in_specs=PartitionSpec(batch_axes),
            out_specs=PartitionSpec(),
        )
    )(x)
    gathered = jax.jit(lambda a: a, out_shardings=replicated)(x)

    def local(array: jax.Array) -> np.ndarray:
        return np.asarray(array.addressable_data(0))

    print(json.dumps({
        "info": [info.process_index, info.process_count, info.local_device_count,
                 info.device_count],
        "idempotent": again == info,
        "global_shape": list(x.shape),
        "spec": str(x.sharding.spec),
        "sum": float(local(total)),
        "psum": float(local(psum)),
        "gathered": local(gathered).tolist(),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
