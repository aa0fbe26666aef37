"""`python -m experiments.reproduce globalpointer|rdrop` end to end on the smoke preset.

Subprocesses, as a user runs them; tiny models trained for two steps on the first 32
CLUENER sentences check the plumbing (runs, table, JSON, plot, train commands), not
the numbers. XLA's backend optimisation is off in the subprocess: compiling dominates.
"""

from __future__ import annotations

import json
import re

import pytest

from experiments.studies import globalpointer, rdrop
from tests.conftest import CLUENER_MISSING, HAVE_CLUENER
from tests.experiments._smoke import check_png, run_smoke_study

pytestmark = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


@pytest.mark.slow
def test_globalpointer_smoke_study(tmp_path):
    out, result = run_smoke_study(tmp_path, "globalpointer")
    record = json.loads((out / "globalpointer.json").read_text())
    names = [name for name, _, _ in globalpointer.GP_VARIANTS] + [globalpointer.SPARSE_VARIANT[0]]
    assert record["study"] == "globalpointer" and record["seeds"] == [0]
    assert list(record["variants"]) == names
    for name, variant in record["variants"].items():
        assert list(variant["scores"]) == ["0"] and variant["f1_std"] is None
        assert 0.0 <= variant["f1_mean"] <= 1.0
        command = variant["train_commands"]["0"]
        assert command.startswith("python -m experiments.train --config configs/cluener_")
        assert "--config.seed=0" in command, command
        assert variant["head_params"] > 0, name
        # Evaluated every step of two: the best evaluation is one of the curve's points.
        scores = variant["scores"]["0"]
        assert list(scores["f1_curve"]) == ["1", "2"]
        assert scores["best_step"] in (1, 2)
        assert scores["best_f1"] == max(scores["f1_curve"].values())
        assert scores["f1"] == scores["f1_curve"]["2"]
        assert "--workdir runs/" not in command and "--workdir /" in command  # outside repo
    # The BIO task trains and is scored by the same span counts, against every gold span.
    bio = record["variants"]["BIO softmax tagger"]["scores"]["0"]
    assert bio["gold_spans"] > 0 and bio["bio_unrepresentable"] >= 0
    assert bio["tp"] + bio["fn"] == bio["gold_spans"] and 0.0 <= bio["f1"] <= 1.0
    assert "--config.model.gp_rope=False" in \
        record["variants"]["GlobalPointer, no RoPE"]["train_commands"]["0"]
    # Efficient GlobalPointer has the smaller head.
    heads = {name: v["head_params"] for name, v in record["variants"].items()}
    assert heads["Efficient GlobalPointer"] < heads["GlobalPointer (RoPE)"]
    (row,) = record["zlpr_memory"]
    # Dense and sparse ZLPR are one loss: the same value on the same batch.
    assert row["dense"]["loss"] == pytest.approx(row["sparse"]["loss"], rel=1e-5)
    assert row["dense"]["peak_bytes"] > 0 and row["sparse"]["step_ms"] > 0
    table = (out / "globalpointer.md").read_text()
    for name in names:
        assert re.search(rf"^\| {re.escape(name)} \| \d+\.\d\d \| [12] \|", table,
                         re.MULTILINE), name
    assert "| [8, 10, 16, 16] | dense |" in table and "| [8, 10, 16, 16] | sparse |" in table
    assert "| head | best dev F1 | step of best |" in table
    assert "![best dev F1 per head and F1 during training](globalpointer.png)" in table
    check_png(out / "globalpointer.png")
    assert "updated" not in result.stdout  # docs/results.md is left alone for other --out


@pytest.mark.slow
def test_rdrop_smoke_study(tmp_path):
    out, _ = run_smoke_study(tmp_path, "rdrop")
    record = json.loads((out / "rdrop.json").read_text())
    assert record["study"] == "rdrop" and record["steps"] == 2
    assert [v["rdrop_alpha"] for v in record["variants"].values()] == [0.0, rdrop.ALPHA]
    assert list(record["variants"]) == [rdrop.variant_name(a, 0.1) for a in (0.0, rdrop.ALPHA)]
    for variant in record["variants"].values():
        assert list(variant["f1_curve"]["0"]) == ["1", "2"]  # eval every steps / 2 (≥ 1)
        scores = variant["scores"]["0"]
        assert scores["best_f1"] == max(variant["f1_curve"]["0"].values())
        assert scores["best_step"] in (1, 2) and scores["f1"] == variant["f1_curve"]["0"]["2"]
        command = variant["train_commands"]["0"]
        assert f"--config.objective.rdrop_alpha={variant['rdrop_alpha']}" in command
        assert "--config.model.dropout_rate=0.1" in command
    with_rdrop = record["variants"][rdrop.variant_name(rdrop.ALPHA, 0.1)]
    assert all(kl >= 0 for kl in with_rdrop["train_gp_kl"]["0"].values())
    assert with_rdrop["train_gp_kl"]["0"]  # the divergence is logged as it trains
    table = (out / "rdrop.md").read_text()
    assert "| objective | dropout | α | best dev F1 | step of best |" in table
    assert "| GlobalPointer + R-Drop (α = 4) | 0.1 | 4 |" in table
    assert "![dev F1 vs steps](rdrop.png)" in table
    check_png(out / "rdrop.png")


def test_rdrop_presets_cover_the_grid_and_the_small_training_subset():
    for name in ("overfit", "gpu", "gpu_overfit"):
        _, _, _, evals, alphas, dropouts = rdrop.PRESETS[name]
        assert {0.0, 1.0, 4.0} < set(alphas) and min(a for a in alphas if a) <= 0.1
        assert set(dropouts) == {0.1, 0.3}
        assert evals >= 8  # best evaluation of several
    assert rdrop.PRESETS["overfit"][1]["data.max_examples"] == rdrop.SUBSET
    assert rdrop.PRESETS["gpu_overfit"][1]["data.max_examples"] == rdrop.SUBSET
    assert "data.max_examples" not in rdrop.PRESETS["gpu"][1]
