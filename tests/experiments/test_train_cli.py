"""`experiments.train` / `experiments.evaluate` end to end, as a user runs them (subprocesses).

Smoke presets on CPU. The stdlib corpus (and CLUENER) are built once per session in a
temporary `data.data_dir` shared by every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER

ROOT = Path(__file__).resolve().parents[2]
needs_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


def run_cli(module: str, *args: str, devices: int = 1,
            timeout: float = 300) -> subprocess.CompletedProcess:
    flags = ["--xla_backend_optimization_level=0"]  # compiling dominates these runs
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": " ".join(flags),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def train(config: str, workdir: Path, data_dir: Path, *overrides: str,
          devices: int = 1) -> subprocess.CompletedProcess:
    result = run_cli("experiments.train", "--config", f"{config}:smoke", "--workdir",
                     str(workdir), f"--config.data.data_dir={data_dir}", *overrides,
                     devices=devices)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def records(workdir: Path, split: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def curve(workdir: Path, split: str, name: str = "loss") -> dict[int, float]:
    return {r["step"]: r[name] for r in records(workdir, split)}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted 1-device smoke run of configs/lm_stdlib.py (8 steps)."""
    workdir = tmp_path_factory.mktemp("lm") / "run"
    return workdir, train("configs/lm_stdlib.py", workdir, data_dir)


@pytest.mark.slow
def test_lm_smoke_run_learns_logs_and_samples(lm_run):
    workdir, result = lm_run
    assert '"preset": "smoke"' in result.stdout  # the resolved config is printed
    evals = curve(workdir, "eval")
    assert sorted(evals) == [4, 8], evals
    assert evals[8] < evals[4], evals
    bpb = curve(workdir, "eval", "bits_per_byte")
    np.testing.assert_allclose(bpb[8], evals[8] / np.log(2), rtol=1e-6)
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["step"] == 8 and final["eval"]["loss"] == pytest.approx(evals[8])
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["num_steps"] == 8 and "vocab_size" not in saved["model"]
    assert list((workdir / "tensorboard").iterdir()), "no TensorBoard event file"
    assert "sample (greedy) from 'def '" in result.stdout


@pytest.mark.slow
def test_resume_after_stop_reproduces_the_uninterrupted_run(lm_run, tmp_path, data_dir):
    reference, _ = lm_run
    workdir = tmp_path / "resumed"
    train("configs/lm_stdlib.py", workdir, data_dir, "--config.train.num_steps=4")
    assert max(curve(workdir, "train")) == 4
    again = train("configs/lm_stdlib.py", workdir, data_dir)
    assert "config differs" in again.stdout and "train.num_steps: 4 -> 8" in again.stdout
    for split in ("train", "eval"):
        assert curve(workdir, split) == curve(reference, split), split


@pytest.mark.slow
def test_eight_devices_match_one_device(lm_run, tmp_path, data_dir):
    reference, _ = lm_run
    workdir = tmp_path / "mesh222"
    result = train("configs/lm_stdlib.py", workdir, data_dir, "--config.mesh.data=2",
                   "--config.mesh.fsdp=2", "--config.mesh.tensor=2", devices=8)
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in result.stdout
    for split in ("train", "eval"):
        ours, theirs = curve(workdir, split), curve(reference, split)
        assert sorted(ours) == sorted(theirs)
        np.testing.assert_allclose([ours[s] for s in sorted(ours)],
                                   [theirs[s] for s in sorted(ours)], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_final_eval(lm_run):
    workdir, _ = lm_run
    result = run_cli("experiments.evaluate", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-5000:]
    final = json.loads((workdir / "final_metrics.json").read_text())["eval"]
    again = json.loads((workdir / "evaluate.json").read_text())
    assert again["step"] == 8
    for name, value in final.items():
        assert again["eval"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("override, message", [
    ("--config.model.widht=64", "unknown config key `model.widht`; did you mean `width`?"),
    ("--config.trian.num_steps=3", "Did you mean train"),
    ("--config.optimizer.name=adam", "`optimizer.name`: expected one of"),
    ("--config.preset=smoke", "name the preset in the config argument"),
    ("--config.optimizer.adamw.learning_rate=5.0",
     "optimizer.name is 'amos', which reads `optimizer.amos` only"),
])
def test_bad_config_fails_fast_with_a_clear_message(tmp_path, override, message):
    result = run_cli("experiments.train", "--config", "configs/lm_stdlib.py:smoke",
                     "--workdir", str(tmp_path / "bad"), override)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config error:" in result.stderr and message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "bad").exists()  # nothing built, nothing written


@pytest.mark.parametrize("overrides, message", [
    (("--config.mesh.data=8", "--config.data.batch_size=12"),
     "`data.batch_size`: expected a multiple of mesh.data × mesh.fsdp × "
     "train.grad_accum_steps = 8 × 1 × 1 = 8"),
    (("--config.mesh.data=3",), "mesh.data"),
    (("--config.model.num_heads=5",), "`model.num_heads`"),
])
def test_incompatible_combinations_fail_before_compiling(tmp_path, overrides, message):
    """Mesh vs devices, batch vs data parallelism, heads vs width: named, nothing written."""
    result = run_cli("experiments.train", "--config", "configs/lm_stdlib.py:smoke",
                     "--workdir", str(tmp_path / "bad"), *overrides, devices=8)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config error:" in result.stderr and message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_mlm_smoke_reports_accuracy_per_length(tmp_path, data_dir):
    workdir = tmp_path / "mlm"
    # The head at the chosen positions only (data.mlm_max_predictions) in training.
    train("configs/mlm_extrapolation.py", workdir, data_dir,
          "--config.objective.positions=random_equal_mean",
          "--config.data.mlm_max_predictions=16")
    final = records(workdir, "eval")[-1]
    for length in (64, 128):
        assert 0.0 <= final[f"accuracy_{length}"] <= 1.0 and final[f"loss_{length}"] > 0
    logged = records(workdir, "train")[-1]
    assert 0.0 <= logged["accuracy"] <= 1.0 and np.isfinite(logged["loss"])


@needs_cluener
@pytest.mark.parametrize("config, overrides, metrics", [
    ("configs/cluener_globalpointer.py", ("--config.model.gp_loss=sparse",
                                          "--config.model.efficient=True"),
     ("precision", "recall", "f1", "tp", "fp", "fn")),
    ("configs/cluener_multilabel.py", ("--config.objective.loss=sigmoid_bce",),
     ("micro_f1", "macro_f1")),
])
@pytest.mark.slow
def test_cluener_smoke(tmp_path, data_dir, config, overrides, metrics):
    workdir = tmp_path / "cluener"
    train(config, workdir, data_dir, f"--config.data.manual_dir={CLUENER_DIR}", *overrides)
    final = records(workdir, "eval")[-1]
    for name in metrics:
        assert np.isfinite(final[name]), (name, final)
    if "f1" in final:  # the F1 of the summed counts, not a mean of per-batch F1s
        tp, fp, fn = final["tp"], final["fp"], final["fn"]
        assert final["f1"] == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1), abs=1e-6)
