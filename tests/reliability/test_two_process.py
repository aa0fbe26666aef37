"""Two local processes (jax.distributed on 127.0.0.1, gloo CPU collectives).

* A two-process toy training run agrees with a one-process run of the same global
  batch (same losses, same final parameters up to float32 reduction order).
* When one process is SIGKILLed mid-run the other exits with an error within a
  bounded time (the heartbeat timeout is set to 5 s in the worker; JAX's default is
  100 s) instead of hanging: JAX's coordination service reports the dead task and
  aborts the survivor with a message saying another task died, or a collective
  fails first with gloo's `Connection reset by peer`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import portpicker
import pytest

from tests.reliability.two_process_kill import kill_one, start, stop

SURVIVOR_DEADLINE_S = 60.0


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_two_process_run_matches_one_process_run(tmp_path):
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    logs = [tmp_path / f"p{i}.log" for i in range(3)]
    processes = [start(address, 2, i, tmp_path / "two", logs[i]) for i in range(2)]
    processes.append(start("-", 1, 0, tmp_path / "one", logs[2]))
    try:
        for process in processes:
            process.wait(timeout=120)
    finally:
        stop(processes)
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log.read_text()
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert list(two) == list(range(1, 7))
    np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-6)
    with np.load(tmp_path / "two" / "final_params.npz") as a, \
            np.load(tmp_path / "one" / "final_params.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["b1", "b2", "w1", "w2"]
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7)
    saved = sorted(int(n) for n in os.listdir(tmp_path / "two" / "checkpoints") if n.isdigit())
    assert saved == [3, 6]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_survivor_exits_with_error_when_the_other_process_dies(tmp_path, victim):
    result = kill_one(victim, str(tmp_path), heartbeat_timeout=5, deadline=SURVIVOR_DEADLINE_S)
    log = result["log"]
    assert result["survivor_exit"] is not None, f"survivor still runs after 60 s:\n{log[-3000:]}"
    assert result["survivor_exit"] != 0, log[-3000:]
    # Whichever notices first: the coordination service, or the broken gloo connection.
    assert any(sign in log for sign in ("another task died", "heartbeat timeout",
                                        "Connection reset by peer")), log[-3000:]
