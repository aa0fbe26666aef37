"""`kill -9` a toy training run at random points, restart it each time, compare with an
uninterrupted run.

    python -m tests.reliability.kill_resume --kills 20 --seed 0

A reference run trains `--steps` steps without interruption. Then the same run is
started in a fresh workdir and SIGKILLed `--kills` times, each time restarted on
the same workdir. Kill points are drawn from the seed (and printed): most kills come
a random 0-30 ms after a random step (so they land inside steps, metric writes and
asynchronous or synchronous checkpoint saves), some a random time after the process
starts (during imports, compilation or checkpoint restore). Every restart picks
synchronous or asynchronous saves at random.

Checked, for every restart: it resumes from the newest finalized checkpoint on disk,
and no step reported as saved (`checkpoint saved: step N`) is lost, i.e. the restart
resumes from at least the newest reported step. At the end: the final parameters
and the loss curve (`metrics.jsonl`, de-duplicated by step) equal the reference run's
bit for bit. Exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CURVE_FIELDS = ("loss", "mae", "grad_norm", "nonfinite", "nonfinite_steps",
                "consecutive_nonfinite")
STARTUP_TIMEOUT_S = 120.0


def worker_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


def start_worker(workdir: str, log_path: str, *, steps: int, checkpoint_every: int,
                 sync: bool, step_sleep: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.reliability._train_worker", workdir,
               "--steps", str(steps), "--checkpoint-every", str(checkpoint_every),
               "--step-sleep", str(step_sleep)] + (["--sync"] if sync else [])
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(command, cwd=ROOT, env=worker_env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.log.close()  # type: ignore[attr-defined]


def last_batch(log_path: str) -> int:
    """Steps completed according to the worker's `BATCH i` lines (-1 before the first)."""
    with open(log_path, encoding="utf-8", errors="replace") as file:
        found = re.findall(r"^BATCH (\d+)$", file.read(), re.M)
    return int(found[-1]) if found else -1


def parse_log(log_path: str) -> dict[str, list[int]]:
    with open(log_path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    return {"saved": [int(s) for s in re.findall(r"checkpoint saved: step (\d+)", text)],
            "restored": [int(s) for s in re.findall(r"restored checkpoint step (\d+)", text)],
            "corrupt": [int(s) for s in re.findall(r"checkpoint step (\d+) in .* could not be "
                                                   r"restored", text)]}


def finalized_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def curve(workdir: str) -> tuple[dict[tuple[str, int], dict[str, float]], int]:
    """metrics.jsonl de-duplicated by (split, step), last record wins; also the duplicate count."""
    records: dict[tuple[str, int], dict[str, float]] = {}
    duplicates = 0
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            key = (record["split"], record["step"])
            duplicates += key in records
            records[key] = {name: record[name] for name in CURVE_FIELDS if name in record}
    return records, duplicates


@dataclasses.dataclass
class Attempt:
    number: int
    sync: bool
    plan: str
    resumed_from: int | None = None
    expected_resume: int | None = None
    killed_after_step: int | None = None
    reported_saved: list[int] = dataclasses.field(default_factory=list)
    corrupt_skipped: list[int] = dataclasses.field(default_factory=list)
    exit: str = ""


def kill_resume(*, kills: int, seed: int, steps: int, checkpoint_every: int,
                step_sleep: float, workdir: str, startup_fraction: float = 0.2,
                echo=print) -> dict:
    """Runs the experiment (module doc); returns a summary dict with `ok`."""
    rng = np.random.default_rng(seed)
    targets = np.sort(rng.choice(np.arange(1, steps), size=kills, replace=False))
    plans = []
    for target in targets:
        if rng.random() < startup_fraction:
            plans.append(("startup", float(rng.uniform(0.5, 4.0))))
        else:
            plans.append((int(target), float(rng.uniform(0.0, 0.03))))
    echo(f"seed {seed}: {kills} kills over {steps} steps, checkpoint every "
         f"{checkpoint_every}; plan (step or 'startup', delay s): "
         + ", ".join(f"{p}+{d:.3f}" if p != "startup" else f"startup+{d:.2f}"
                     for p, d in plans))
    reference_dir = os.path.join(workdir, "reference")
    resumed_dir = os.path.join(workdir, "killed")
    started = time.monotonic()
    os.makedirs(reference_dir)
    reference = start_worker(reference_dir, reference_dir + ".log", steps=steps,
                             checkpoint_every=checkpoint_every, sync=True, step_sleep=0.0)
    if finish(reference, STARTUP_TIMEOUT_S + 10 * steps * max(step_sleep, 0.05)) != 0:
        raise RuntimeError("the reference run failed:\n" + open(reference_dir + ".log").read())
    os.makedirs(resumed_dir)
    attempts: list[Attempt] = []
    plan_index = 0
    while True:
        number = len(attempts) + 1
        sync = bool(rng.integers(2))
        plan = plans[plan_index] if plan_index < len(plans) else None
        attempt = Attempt(number, sync, "run to the end" if plan is None else
                          (f"kill {plan[1]:.2f}s after start" if plan[0] == "startup" else
                           f"kill {plan[1] * 1000:.0f}ms after step {plan[0]}"))
        on_disk = finalized_steps(resumed_dir)
        attempt.expected_resume = on_disk[-1] if on_disk else 0
        log_path = os.path.join(workdir, f"attempt{number:02d}.log")
        process = start_worker(resumed_dir, log_path, steps=steps,
                               checkpoint_every=checkpoint_every, sync=sync,
                               step_sleep=step_sleep)
        spawned = time.monotonic()
        killed = False
        if plan is not None:
            where, delay = plan
            while process.poll() is None:
                if where == "startup":
                    if time.monotonic() - spawned >= delay:
                        break
                elif last_batch(log_path) >= where:
                    time.sleep(delay)
                    break
                if time.monotonic() - spawned > STARTUP_TIMEOUT_S + steps * (step_sleep + 1):
                    raise RuntimeError(f"attempt {number} made no progress:\n"
                                       + open(log_path).read())
                time.sleep(0.005)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                plan_index += 1
        code = finish(process, STARTUP_TIMEOUT_S + steps * (step_sleep + 1))
        attempt.killed_after_step = last_batch(log_path) if killed else None
        attempt.exit = "SIGKILL" if killed else f"exit {code}"
        parsed = parse_log(log_path)
        attempt.resumed_from = parsed["restored"][-1] if parsed["restored"] else (
            0 if last_batch(log_path) >= 0 else None)  # None: killed before restoring
        attempt.reported_saved = parsed["saved"]
        attempt.corrupt_skipped = parsed["corrupt"]
        attempts.append(attempt)
        if not killed:
            if code != 0:
                raise RuntimeError(f"attempt {number} failed with exit code {code}:\n"
                                   + open(log_path).read())
            break

    # Checks.
    lost = []
    wrong_resume = []
    newest_reported = 0
    for attempt in attempts:
        if attempt.resumed_from is not None:
            if attempt.resumed_from < newest_reported:
                lost.append((attempt.number, newest_reported, attempt.resumed_from))
            if attempt.resumed_from != attempt.expected_resume:
                wrong_resume.append((attempt.number, attempt.expected_resume,
                                     attempt.resumed_from))
        if attempt.reported_saved:
            newest_reported = max(newest_reported, max(attempt.reported_saved))
    reference_curve, _ = curve(reference_dir)
    resumed_curve, duplicates = curve(resumed_dir)
    curve_equal = reference_curve == resumed_curve
    with np.load(os.path.join(reference_dir, "final_params.npz")) as a, \
            np.load(os.path.join(resumed_dir, "final_params.npz")) as b:
        params_equal = sorted(a.files) == sorted(b.files) and all(
            a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes()
            for name in a.files)
    corrupt = sorted({s for attempt in attempts for s in attempt.corrupt_skipped})
    kills_done = sum(attempt.exit == "SIGKILL" for attempt in attempts)
    ok = (kills_done == kills and not lost and not wrong_resume and curve_equal
          and params_equal)

    echo("")
    echo(f"{'run':>3} {'saves':5} {'plan':28} {'resumed from':>12} {'newest on disk':>14} "
         f"{'killed after':>12} {'saved (reported)':24} exit")
    for a in attempts:
        resumed = "-" if a.resumed_from is None else str(a.resumed_from)
        after = "-" if a.killed_after_step is None else (
            "startup" if a.killed_after_step < 0 else f"step {a.killed_after_step}")
        echo(f"{a.number:>3} {'sync' if a.sync else 'async':5} {a.plan:28} {resumed:>12} "
             f"{a.expected_resume:>14} {after:>12} {a.reported_saved!s:24} {a.exit}")
    echo("")
    summary = {
        "seed": seed, "steps": steps, "kills": kills_done, "restarts": len(attempts) - 1,
        "resumed_from": [a.resumed_from for a in attempts[1:]],
        "checkpoints_lost": len(lost), "resumed_not_from_newest": len(wrong_resume),
        "corrupt_checkpoints_skipped": len(corrupt),
        "metrics_duplicates_removed": duplicates,
        "loss_curve_equal": curve_equal, "final_params_equal": params_equal,
        "wall_s": round(time.monotonic() - started, 1), "ok": ok,
    }
    for name, value in summary.items():
        echo(f"{name:28} {value}")
    if lost:
        echo(f"LOST (attempt, newest reported, resumed from): {lost}")
    if wrong_resume:
        echo(f"NOT RESUMED FROM NEWEST (attempt, newest on disk, resumed from): {wrong_resume}")
    if not curve_equal:
        diff = sorted(k for k in reference_curve.keys() | resumed_curve.keys()
                      if reference_curve.get(k) != resumed_curve.get(k))
        echo(f"curve differs at (split, step): {diff[:10]}")
    echo("result: " + ("PASS" if ok else "FAIL"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.02,
                        help="seconds each batch takes to arrive (spreads kill points)")
    parser.add_argument("--workdir", help="kept afterwards (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.kills >= args.steps:
        parser.error("--kills must be smaller than --steps")
    workdir = args.workdir or tempfile.mkdtemp(prefix="kexue_kill_resume_")
    try:
        summary = kill_resume(kills=args.kills, seed=args.seed, steps=args.steps,
                              checkpoint_every=args.checkpoint_every,
                              step_sleep=args.step_sleep, workdir=workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
