"""Multi-process start-up and feeding per-host data into global arrays.

One program runs per host (or per GPU); `initialize_distributed` connects them so
that `jax.devices()` lists every device of the job and a mesh can span hosts. Each
process then loads only its share of a batch and `host_local_to_global` stitches the
shares into one global `jax.Array`.

A multi-process run is recognised, in this order, from

1. the arguments `coordinator_address`, `num_processes`, `process_id`;
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID` (`JAX_LOCAL_DEVICE_IDS` and `JAX_COORDINATOR_PORT` are read by
   JAX itself);
3. a cluster that `jax.distributed.initialize` configures by itself, detected here
   from its environment variables: Slurm (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`,
   `SLURM_NTASKS` > 1, `SLURM_PROCID`, `SLURM_LOCALID`), Open MPI (`mpirun`:
   `OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE` > 1) and Cloud TPU slices on GKE
   (`TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` listing several hosts).

A Cloud TPU VM slice that publishes its workers only through the GCE metadata
server is not detected this way (querying it costs a network round trip on every
machine); there pass `num_processes=` (or set `JAX_NUM_PROCESSES`) and JAX fills in
the coordinator and process id from the metadata. Anything else is a single process
and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kexue.parallel.rules import logical_to_mesh_spec


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in the job."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _cluster_has_several_processes() -> bool:
    """True when a Slurm, Open MPI or GKE TPU environment describes more than one process."""
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(name in env for name in slurm) and (_env_int("SLURM_NTASKS") or 1) > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([host for host in hosts.split(",") if host.strip()]) > 1


def _info() -> DistributedInfo:
    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    heartbeat_timeout_seconds: int | None = None,
) -> DistributedInfo:
    """Joins the multi-process job if there is one (see the module doc); safe to call twice.

    Call it first thing, before any other JAX call: once a backend has started JAX can
    no longer join a job (it then raises `RuntimeError`). A second call, or a call
    after `jax.distributed.initialize` was run directly, only reports the state.

    Args:
      coordinator_address: `host:port` of process 0's coordinator service.
      num_processes: number of processes in the job; 1 means single-process.
      process_id: this process's index in `[0, num_processes)`.
      local_device_ids: restricts the devices this process uses (GPU: one process
        per GPU).
      cpu_collectives: cross-process collectives for the CPU backend ("gloo" or
        "mpi"), written to `jax_cpu_collectives_implementation` before the backend
        starts; GPU and TPU backends ignore it. None leaves the setting alone.
      heartbeat_timeout_seconds: how long the survivors wait for a process that
        stopped answering before they abort with an error (JAX's default, None,
        is 100 s). `tests/reliability/two_process_kill.py` measures it.

    Returns:
      `DistributedInfo(process_index, process_count, local_device_count,
      device_count)` for the job as JAX now sees it.

    Raises:
      ValueError: an environment variable is not an integer, or JAX is already
        initialised with a different `num_processes`.
    """
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if jax.distributed.is_initialized():
        info = _info()
        if num_processes is not None and num_processes != info.process_count:
            raise ValueError(
                f"JAX is already initialised with {info.process_count} processes, "
                f"but `num_processes` = {num_processes} was requested"
            )
        return info
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is not None:
        wanted = num_processes > 1
    else:
        wanted = coordinator_address is not None or _cluster_has_several_processes()
    if wanted:
        if cpu_collectives is not None:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        options = {}
        if heartbeat_timeout_seconds is not None:
            options["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            **options,
        )
    return _info()


def host_local_to_global(
    batch: Any, mesh: Mesh, spec: PartitionSpec | None = None
) -> Any:
    """Assembles each process's share of a batch into global `jax.Array`s.

    Every process calls this with its own rows: `batch` is a pytree of host arrays
    whose leading (batch) dimension holds this process's examples, in the order of
    its devices along the mesh. The global batch dimension is the sum over
    processes; other dimensions are the same everywhere. In a single process this
    is a sharded `jax.device_put`.

    Args:
      batch: pytree of NumPy (or JAX) arrays, this process's part.
      mesh: the global mesh.
      spec: how every leaf is sharded; it names leading dimensions and the rest are
        replicated. Default: the `batch` logical rule, i.e. the leading dimension
        split over the `data` and `fsdp` axes.

    Returns:
      The same pytree of global arrays with `NamedSharding(mesh, spec)`.
    """
    if spec is None:
        spec = logical_to_mesh_spec(("batch",), mesh=mesh)
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda local: jax.make_array_from_process_local_data(sharding, np.asarray(local)), batch
    )
