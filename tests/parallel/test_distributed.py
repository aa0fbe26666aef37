"""Multi-process start-up: when it triggers, host-local batches, and a real 2-process CPU job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest
from jax.sharding import PartitionSpec as P

from kexue.parallel import DistributedInfo, host_local_to_global, initialize_distributed, make_mesh

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_multihost_worker.py")
CLUSTER_VARIABLES = [
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
]
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.fixture
def calls(monkeypatch):
    """A clean cluster environment; records calls to `jax.distributed.initialize`."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    before = jax.config.jax_cpu_collectives_implementation
    yield recorded
    jax.config.update("jax_cpu_collectives_implementation", before)


def test_single_process_initialises_nothing(calls):
    info = initialize_distributed()
    assert calls == []
    assert info == DistributedInfo(process_index=0, process_count=1, local_device_count=8,
                                   device_count=8)
    assert initialize_distributed() == info


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "1"}, ("10.0.0.1:1234", 2, 1)),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, ("10.0.0.1:1234", None, None)),
        ({"JAX_NUM_PROCESSES": "4"}, (None, 4, None)),  # GCE TPU VM: JAX finds the rest
        ({**SLURM, "SLURM_NTASKS": "4"}, (None, None, None)),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "2"},
         (None, None, None)),
        ({"TPU_WORKER_HOSTNAMES": "host-a,host-b"}, (None, None, None)),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, (None, None, None)),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1"}, None),
        ({**SLURM, "SLURM_NTASKS": "1"}, None),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "host-a"}, None),
    ],
)
def test_which_environments_start_a_job(calls, monkeypatch, environment, expected):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    jax.config.update("jax_cpu_collectives_implementation", "mpi")
    initialize_distributed()
    if expected is None:
        assert calls == []
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
        return
    address, count, index = expected
    assert calls == [{"coordinator_address": address, "num_processes": count,
                      "process_id": index, "local_device_ids": None}]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_arguments_start_a_job(calls):
    initialize_distributed("127.0.0.1:5000", 2, 0, local_device_ids=[0])
    assert calls == [{"coordinator_address": "127.0.0.1:5000", "num_processes": 2,
                      "process_id": 0, "local_device_ids": [0]}]
    initialize_distributed("127.0.0.1:5000", 1, 0)
    assert len(calls) == 1


def test_bad_environment_names_the_variable(calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="environment variable JAX_NUM_PROCESSES must be an "
                                         "integer, got 'two'"):
        initialize_distributed()


def test_host_local_to_global_in_one_process(rng):
    mesh = make_mesh(2, 2, 2)
    batch = {"tokens": rng.integers(0, 100, size=(8, 5)).astype(np.int32),
             "labels": rng.normal(size=(8,)).astype(np.float32)}
    global_batch = host_local_to_global(batch, mesh)
    for name, local in batch.items():
        array = global_batch[name]
        assert array.shape == local.shape
        assert array.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(array), local)
    by_data = host_local_to_global(batch, mesh, P("data"))
    assert by_data["tokens"].sharding.spec == P("data")
    assert {s.data.shape for s in by_data["tokens"].addressable_shards} == {(4, 5)}


def test_two_process_cpu_job():
    """Two local processes × 2 CPU devices: one global array, a global sum and a psum."""
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    env = {name: value for name, value in os.environ.items() if name not in CLUSTER_VARIABLES}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    workers = [
        subprocess.Popen([sys.executable, str(WORKER), address, "2", str(index)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=60))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        logs = [worker.communicate()[1] for worker in workers]
        pytest.fail("workers timed out after 60 s\n" + "\n".join(
            f"--- process {i} stderr ---\n{log}" for i, log in enumerate(logs)))

    everything = np.arange(12, dtype=np.float64).reshape(4, 3)
    for index, (worker, (stdout, stderr)) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0, f"process {index} failed:\n{stderr}"
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert lines, f"process {index} printed no result:\n{stdout}\n{stderr}"
        result = json.loads(lines[-1])
        assert result["info"] == [index, 2, 2, 4]
        assert result["idempotent"]
        assert result["global_shape"] == [4, 3]
        assert result["spec"] == str(P(("data", "fsdp")))
        assert result["sum"] == pytest.approx(everything.sum())
        assert result["psum"] == pytest.approx(everything.sum())
        np.testing.assert_array_equal(np.array(result["gathered"]), everything)
