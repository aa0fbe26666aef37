"""SIGTERM mid-run: the step finishes, a checkpoint is saved, the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from kexue.train import PreemptionGuard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_guard_turns_signal_into_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(2) and guard.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_mid_run_saves_and_exits_zero(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.train._preempt_worker", str(tmp_path)], cwd=ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 90
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert worker.poll() is None, worker.stdout.read()
            assert time.monotonic() < deadline, "the worker did not start training in time"
            time.sleep(0.2)
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, output
    assert "received SIGTERM" in output and "preempted=True" in output, output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert saved == [steps[-1]], (saved, steps[-1])
    assert f"checkpoint saved: step {saved[0]}" in output
    assert not (tmp_path / "final_metrics.json").exists()
