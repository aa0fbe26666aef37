"""`python -m experiments.reproduce multilabel|optimizers` end to end on their smoke presets.

Each smoke study is a subprocess, as run: a tiny model trained for two steps per run.
It checks the plumbing (runs, JSON, table, plot), not the numbers. XLA's backend
optimisation is turned off in the subprocess: compiling dominates here. The
curve-reading helper of the optimizer study is checked on its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments import reproduce
from experiments.studies import multilabel, optimizers
from tests.experiments._smoke import check_png, run_smoke_study

NUMBER = r"\d+\.\d\d"


def _smoke(tmp_path_factory, study: str) -> Path:
    out, result = run_smoke_study(tmp_path_factory.mktemp(study), study, timeout=900)
    assert "updated" not in result.stdout  # docs/results.md is left alone for other --out
    check_png(out / f"{study}.png")
    return out


def test_studies_are_registered():
    assert reproduce.STUDIES["multilabel"] == "experiments.studies.multilabel"
    assert reproduce.STUDIES["optimizers"] == "experiments.studies.optimizers"
    for module in (multilabel, optimizers):
        assert {"default", "smoke"} <= set(module.PRESETS)


@pytest.mark.slow
def test_multilabel_smoke_study(tmp_path_factory):
    out = _smoke(tmp_path_factory, "multilabel")
    record = json.loads((out / "multilabel.json").read_text())
    assert record["study"] == "multilabel" and record["seeds"] == [0]
    assert record["preset"] == "smoke" and record["steps"] == 2
    assert record["rare_types"] == list(multilabel.RARE_TYPES)
    assert record["keep_fractions"] == [1.0, 0.5]
    counts = record["train_type_counts"]
    assert counts["1.0"]["0"]["sentences"] == 32  # the config's smoke preset: 32 examples
    assert counts["0.5"]["0"]["sentences"] < 32
    for t in multilabel.RARE_TYPES:  # the rare types lose about half their sentences
        assert counts["0.5"]["0"][t] <= counts["1.0"]["0"][t]
    assert len(record["variants"]) == 4
    for variant in record["variants"].values():
        assert variant["loss"] in ("zlpr", "sigmoid_bce")
        scores = variant["scores"]["0"]
        assert set(scores["per_class_f1"]) == set(multilabel.TYPES)
        assert all(0.0 <= scores[m] <= 1.0 for m in multilabel.METRICS)
        assert variant["std"]["micro_f1"] is None  # one seed: no spread
        command = variant["train_commands"]["0"]
        assert "python -m experiments.train --config configs/cluener_multilabel.py:smoke" \
            in command and f"--config.objective.loss={variant['loss']}" in command
        if variant["keep_fraction"] < 1:
            assert "--config.data.type_keep_fraction=0.5" in command
            assert "--config.data.rare_types=movie,book,scene,government,organization" \
                in command
    table = (out / "multilabel.md").read_text()
    for loss in ("ZLPR", "sigmoid BCE"):
        for keep in ("1", "0.5"):
            row = re.search(rf"^\| {loss} \| {keep} \|(.*)\|$", table, re.MULTILINE)
            assert row, f"no row for {loss}, {keep} in\n{table}"
            cells = [cell.strip() for cell in row.group(1).split("|")]
            assert len(cells) == 4 and all(re.fullmatch(NUMBER, c) for c in cells), cells
    assert "| loss | r | movie | book | scene | government | organization |" in table
    assert "![F1 by loss and imbalance](multilabel.png)" in table


@pytest.mark.slow
def test_optimizers_smoke_study(tmp_path_factory):
    out = _smoke(tmp_path_factory, "optimizers")
    record = json.loads((out / "optimizers.json").read_text())
    assert record["study"] == "optimizers" and record["steps"] == 2
    assert list(record["tasks"]) == ["lm", "ner"]
    assert list(record["tasks"]["lm"]["variants"]) == ["adamw", "amos"]
    assert list(record["tasks"]["ner"]["variants"]) == ["adamw", "amos", "adamw, pre-norm"]
    for task in record["tasks"].values():
        memory = task["memory"]
        assert set(memory) == {"adamw", "amos", "amos_factored"}
        assert memory["adamw"]["relative_to_adamw"] == 1.0
        # AdamW keeps m and v (2 × the parameters); Amos with momentum m, v and b
        # (3 ×); factored Amos reduces v and b to small slots.
        params = memory["adamw"]["param_bytes"]
        assert 2 * params <= memory["adamw"]["state_bytes"] < 2 * params + 1024
        assert 3 * params <= memory["amos"]["state_bytes"] < 3 * params + 1024
        assert params < memory["amos_factored"]["state_bytes"] < 2 * params
        best = [name for name, e in task["variants"].items()
                if e["optimizer"] == "adamw" and e["best_of_optimizer"]]
        assert len(best) == 1  # the steps-to-target baseline: AdamW's best variant
        for entry in task["variants"].values():
            assert entry["baseline"] == best[0]
            curves = entry["scores"]["0"]["curves"]
            assert [step for step, _ in curves["train"]] == [1, 2]
            assert [step for step, _ in curves["eval"]] == [1, 2]
            assert entry["steps_to_adamw_eval"]["seeds"] == 1
    ner = record["tasks"]["ner"]
    assert "--config.model.norm_position=pre" in \
        ner["variants"]["adamw, pre-norm"]["train_commands"]["0"]
    # The collapse measurement: a mean cosine and the logit statistics of every NER run.
    for entry in (ner["collapse_at_init"], *(v["collapse"] for v in ner["variants"].values())):
        assert -1.0 <= entry["token_cosine"] <= 1.0
        assert 0.0 <= entry["positive_share"] <= 1.0 and entry["sentences"] > 0
        assert entry["logit_max"] >= entry["sentence_max_logit_median"]
    table = (out / "optimizers.md").read_text()
    for name in ("AdamW", "Amos", "Amos (factored v)"):
        assert table.count(f"| {name} |") + table.count(f"| **{name}** |") == 2, table
    assert table.count("| not trained |") == 2
    assert "| model | token-to-token cosine |" in table
    assert "![eval loss against steps](optimizers.png)" in table


def test_learning_rate_grid_scales_the_configs_rate():
    variants = optimizers.PRESETS["gpu_ner"][0]["ner"][2]
    adamw = [v for v in variants if v.optimizer == "adamw" and not v.overrides]
    rates = [optimizers._overrides("gpu_ner", "ner", 100, 0, v)["optimizer.adamw.learning_rate"]
             if v.lr_factor != 1.0 else None for v in adamw]
    assert len(adamw) == 5 and rates.count(None) == 1
    known = sorted(r for r in rates if r is not None)
    # Half-decade steps around the config's 1e-3: 1e-4, 3.16e-4, 3.16e-3, 1e-2.
    assert known == pytest.approx([1e-4, 10 ** -3.5, 10 ** -2.5, 1e-2], rel=1e-3)
    for opt in optimizers.TRAINED:
        assert sum(v.optimizer == opt for v in variants if not v.overrides) == 5
    assert [v.optimizer for v in optimizers.PRESETS["gpu_lm"][0]["lm"][2]] == [
        opt for opt in optimizers.TRAINED for _ in optimizers.LR_FACTORS]


def test_steps_to_reach_interpolates_between_logged_points():
    curve = [[10, 5.0], [20, 3.0], [30, 2.0]]
    assert optimizers.steps_to_reach(curve, 4.0) == 15.0
    assert optimizers.steps_to_reach(curve, 2.0) == 30.0
    assert optimizers.steps_to_reach(curve, 6.0) == 10.0
    assert optimizers.steps_to_reach(curve, 1.9) is None


def test_read_curves_splits_train_and_eval(tmp_path):
    lines = [{"step": 5, "split": "train", "loss": 2.5, "grad_norm": 1.0},
             {"step": 10, "split": "train", "loss": 2.0},
             {"step": 10, "split": "eval", "loss": 2.2, "f1": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert optimizers.read_curves(tmp_path) == {"train": [[5, 2.5], [10, 2.0]],
                                                "eval": [[10, 2.2]]}


@pytest.mark.parametrize("study", ["multilabel", "optimizers"])
def test_bad_preset_is_rejected(study, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args([study, "--preset", "nope"])
    assert "--preset for study" in capsys.readouterr().err
