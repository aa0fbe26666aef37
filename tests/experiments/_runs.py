"""In-process smoke runs for the tests of what comes after training (load, sample, predict).

Each run goes through `experiments.config` and `experiments.run` exactly as
`experiments.train` does (config.json included), with asynchronous checkpointing and
TensorBoard off to keep them short.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from experiments import config as experiment_config
from experiments import run as experiment_run

ROOT = Path(__file__).resolve().parents[2]


def write_corpus(directory: Path, files: int = 2, lines: int = 200) -> str:
    """`files` small Python-like text files; returns their glob."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        text = "".join(f"def f{index}_{i}(x):\n    return x + {i}\n" for i in range(lines))
        (directory / f"part{index}.txt").write_text(text)
    return str(directory / "*.txt")


def train(config_file: str, workdir: Path, **overrides: Any) -> tuple[Any, Any]:
    """Trains `config_file:smoke` with `overrides` in `workdir`; returns `(run, result)`."""
    config = experiment_config.load(str(ROOT / config_file), preset="smoke", overrides={
        "train.tensorboard": False, "train.async_checkpointing": False, **overrides})
    experiment_config.check(config)
    run = experiment_run.build(config)
    experiment_config.save(config, str(workdir))
    result = experiment_run.train(run, workdir, log=lambda message: None)
    return run, result


def train_lm(workdir: Path, data_dir: Path, pattern: str, **overrides: Any):
    """Two steps of configs/lm_stdlib.py on the files of `pattern`, a checkpoint at each."""
    return train("configs/lm_stdlib.py", workdir, **{
        "data.pattern": pattern, "data.data_dir": str(data_dir), "train.num_steps": 2,
        "train.eval_every": 1, "train.checkpoint_every": 1, "train.log_every": 1,
        "eval.sample_tokens": 0, **overrides})


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` on one CPU device, from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # compiling dominates
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
