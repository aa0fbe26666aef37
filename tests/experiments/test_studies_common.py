"""The shared plumbing of the studies: repository-relative workdirs in the recorded
commands, the dev-evaluation curve of a run and its best evaluation."""

from __future__ import annotations

import json

import pytest

from experiments.studies import common


def test_train_command_names_a_workdir_inside_the_repository_relative_to_it(tmp_path):
    inside = common.ROOT / "runs" / "reproduce" / "study" / "run-seed0"
    command = common.train_command("configs/x.py", inside, "full", {"seed": 0})
    assert "--workdir runs/reproduce/study/run-seed0 " in command
    assert str(common.ROOT) not in command
    outside = tmp_path / "run"
    assert f"--workdir {outside} " in common.train_command("configs/x.py", outside, "smoke",
                                                          {"seed": 0})


def test_eval_curve_keeps_every_evaluation_and_best_evaluation_picks_the_highest(tmp_path):
    rows = [{"step": 10, "split": "train", "loss": 2.0},
            {"step": 10, "time": 1.0, "split": "eval", "f1": 0.2, "loss": 1.5},
            {"step": 20, "split": "eval", "f1": 0.5, "precision": 0.6},
            {"step": 30, "split": "eval", "f1": 0.4},
            {"step": 40, "split": "eval", "f1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = common.eval_curve(tmp_path)
    assert curve == {"10": {"f1": 0.2, "loss": 1.5}, "20": {"f1": 0.5, "precision": 0.6},
                     "30": {"f1": 0.4}, "40": {"f1": 0.5}}
    # The highest F1; on a tie the earlier step, as a kept-best checkpoint would be.
    assert common.best_evaluation(curve) == (20, {"f1": 0.5, "precision": 0.6})
    assert common.best_evaluation(curve, "loss") == (10, {"f1": 0.2, "loss": 1.5})


def test_best_evaluation_of_a_curve_without_the_metric_is_an_error():
    with pytest.raises(ValueError, match="'f1'"):
        common.best_evaluation({"10": {"loss": 1.0}})
