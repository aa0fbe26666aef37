"""SIGKILL one process of a two-process training job; time how long the other takes to exit.

    python -m tests.reliability.two_process_kill --trials 3 [--heartbeat-timeout 5]

Each trial starts `tests.reliability._two_process_worker` twice (jax.distributed on
127.0.0.1, gloo CPU collectives, one CPU device each), waits until the victim has
done a few steps, SIGKILLs it and measures how long the survivor runs on. Victims
alternate: process 1 (a worker) and process 0 (the coordinator). Prints one row per
trial; exits 1 if a survivor exited 0 or ran past `--deadline` seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import portpicker

from tests.reliability.kill_resume import ROOT, last_batch, worker_env


def start(address: str, num_processes: int, index: int, workdir, log_path,
          *extra: str) -> subprocess.Popen:
    env = worker_env()
    if num_processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability._two_process_worker", address,
         str(num_processes), str(index), str(workdir), *extra],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.log.close()  # type: ignore[attr-defined]


def kill_one(victim: int, workdir: str, *, heartbeat_timeout: int = 5,
             deadline: float = 60.0) -> dict:
    """Kills process `victim` after its 4th step; returns the survivor's fate."""
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    logs = [os.path.join(workdir, f"p{i}.log") for i in range(2)]
    processes = [start(address, 2, i, os.path.join(workdir, "run"), logs[i], "--steps",
                       "100000", "--step-sleep", "0.05", "--heartbeat-timeout",
                       str(heartbeat_timeout)) for i in range(2)]
    survivor = processes[1 - victim]
    try:
        started = time.monotonic()
        while last_batch(logs[victim]) < 4:
            if any(p.poll() is not None for p in processes) or time.monotonic() - started > 120:
                raise RuntimeError("the job did not start training:\n" + "\n".join(
                    open(log).read()[-2000:] for log in logs))
            time.sleep(0.05)
        os.killpg(processes[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code: int | None = survivor.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            code = None
        waited = time.monotonic() - killed
    finally:
        stop(processes)
    with open(logs[1 - victim], encoding="utf-8", errors="replace") as file:
        output = file.read()
    found = (re.search(r"(Terminating process because [^.]*\.[^.]*\.)", output)
             or re.search(r"(Task \d+ heartbeat timeout)", output)
             or re.search(r"(Gloo [^:]* failed: .*Connection reset by peer)", output))
    return {"victim": victim, "survivor_exit": code, "seconds": round(waited, 1),
            "message": found[1] if found else output.strip().splitlines()[-1][:160],
            "log": output}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--heartbeat-timeout", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args(argv)
    print(f"heartbeat_timeout_seconds={args.heartbeat_timeout}, deadline {args.deadline} s")
    print(f"{'trial':>5} {'killed':12} {'survivor exit':>13} {'after s':>8}  message")
    ok = True
    for trial in range(args.trials):
        victim = 1 if trial % 2 == 0 else 0
        with tempfile.TemporaryDirectory(prefix="kexue_two_process_") as workdir:
            result = kill_one(victim, workdir, heartbeat_timeout=args.heartbeat_timeout,
                              deadline=args.deadline)
        code = result["survivor_exit"]
        shown = "still running" if code is None else (
            f"{signal.Signals(-code).name}" if code < 0 else str(code))
        ok &= code not in (None, 0)
        print(f"{trial + 1:>5} {'process ' + str(victim):12} {shown:>13} "
              f"{result['seconds']:>8}  {result['message']}", flush=True)
    print("result: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
