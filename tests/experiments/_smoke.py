"""Running `python -m experiments.reproduce STUDY --preset smoke` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_smoke_study(tmp: Path, study: str, *, timeout: int = 600,
                    ) -> tuple[Path, subprocess.CompletedProcess]:
    """Runs `study` on its smoke preset, seed 0, writing under `tmp`; asserts it exits 0.

    Returns the results directory and the finished process. XLA's backend optimisation
    is off in the subprocess: for two-step runs compiling is most of the time.
    """
    out, runs = tmp / "results", tmp / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", study, "--preset", "smoke",
         "--seeds", "0", "--out", str(out), "--runs", str(runs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result


def check_png(path: Path) -> None:
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
