"""Training on one's own text: a single file trains and evaluates on its held-out tail; a
corpus whose held-out split would be empty stops before step 1, naming what to change."""

from __future__ import annotations

import json
import math

import pytest

from experiments import config as experiment_config
from experiments import run as experiment_run
from tests.experiments._runs import ROOT, run_cli, train_lm

EMPTY_HELD_OUT = "config key `data.eval_fraction`: the held-out split ('validation') of"


def test_a_single_text_file_trains_and_evaluates(tmp_path):
    text = "".join(f"print('line {i}')\n" for i in range(400))
    (tmp_path / "mine.txt").write_text(text)
    workdir = tmp_path / "run"
    _, result = train_lm(workdir, tmp_path / "tfds", str(tmp_path / "mine.txt"),
                         **{"data.eval_fraction": 0.1, "data.eval_batches": 0})
    evals = [r for r in map(json.loads, (workdir / "metrics.jsonl").open())
             if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in evals)
    # One pass over the held-out tail and the <eos> after it: every token but the first
    # is a target.
    tail = len(text.encode()) - text.encode().rindex(b"\n", 0, int(0.9 * len(text))) - 1
    assert result.eval_metrics["tokens"] == tail


def _config(pattern: str, data_dir: str, **overrides):
    config = experiment_config.load(str(ROOT / "configs/lm_stdlib.py"), preset="smoke",
                                    overrides={"data.pattern": pattern,
                                               "data.data_dir": data_dir, **overrides})
    experiment_config.check(config)
    return config


@pytest.mark.parametrize("files", [1, 3])
def test_an_empty_held_out_split_is_named_before_anything_is_built(tmp_path, files):
    for index in range(files):
        (tmp_path / f"f{index}.txt").write_text("x = 1\n" * 50)
    config = _config(str(tmp_path / "*.txt"), str(tmp_path / "tfds"),
                     **{"data.eval_fraction": 0.0})
    with pytest.raises(ValueError, match=EMPTY_HELD_OUT.replace("(", r"\(").replace(")", r"\)")):
        experiment_run.build(config)


def test_the_train_command_stops_before_step_1(tmp_path):
    (tmp_path / "mine.txt").write_text("x = 1\n" * 50)
    workdir = tmp_path / "run"
    result = run_cli("experiments.train", "--config", "configs/lm_stdlib.py:smoke",
                     "--workdir", str(workdir), f"--config.data.pattern={tmp_path}/mine.txt",
                     f"--config.data.data_dir={tmp_path}/tfds", "--config.data.eval_fraction=0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"config error: {EMPTY_HELD_OUT}" in result.stderr
    assert "raise eval_fraction" in result.stderr and not workdir.exists()
    assert "Downloading and preparing" not in result.stdout + result.stderr
    assert "Using custom data configuration" not in result.stderr
    assert "has no dataset_info.json" not in result.stderr
