"""`python -m benchmarks.optim --quick`: every optimizer under both compiler settings in
one table and one JSON record, each time against AdamW at its faster setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZERS = ("optax.adamw", "amos", "amos (factored)", "amos_style (adam)",
              "amos_style (factored)")
SETTINGS = ("XLA defaults", "kexue.train CPU options")


@pytest.mark.slow
def test_quick_benchmark_times_every_optimizer_under_both_settings(tmp_path):
    out = tmp_path / "optim.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.optim", "--quick", "--out",
                             str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert sorted((r["optimizer"], r["setting"]) for r in rows) == sorted(
        (o, s) for o in OPTIMIZERS for s in SETTINGS)
    assert record["settings"]["XLA defaults"] is None
    assert record["settings"]["kexue.train CPU options"]  # the train step's options
    # The baseline is AdamW's faster setting: ratio 1 there, >= 1 at its other one.
    adamw = {r["setting"]: r for r in rows if r["optimizer"] == "optax.adamw"}
    fastest = min(adamw.values(), key=lambda r: r["step_seconds"])
    assert record["baseline"] == {"optimizer": "optax.adamw", "setting": fastest["setting"]}
    for row in rows:
        assert row["time_vs_best_adamw"] == pytest.approx(
            row["step_seconds"] / fastest["step_seconds"])
    assert all(r["time_vs_best_adamw"] >= 1.0 for r in adamw.values())
    # The factored Amos slots are far smaller than AdamW's m and v.
    factored = [r for r in rows if r["optimizer"] == "amos (factored)"]
    assert all(r["state_vs_adamw"] < 0.55 for r in factored)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows), result.stdout  # header + one row each
    assert table[0].startswith("| optimizer | compiler setting | step (ms) | time vs best "
                               "AdamW |")
    printed = subprocess.run([sys.executable, "-m", "benchmarks.optim", "--markdown",
                              str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
    assert printed.strip() in result.stdout
