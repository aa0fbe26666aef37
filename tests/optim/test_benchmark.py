"""`python -m benchmarks.optim --quick` runs and prints one row per optimizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_the_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-m", "benchmarks.optim", "--quick"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    # Two tables (XLA defaults, CPU compiler options): header + adamw, amos x2,
    # amos_style x2 each.
    assert len(rows) == 12, result.stdout
    assert "| optax.adamw |" in result.stdout and "| amos (factored) |" in result.stdout
