"""`python -m experiments.reproduce` end to end on the smoke preset (a subprocess, as run).

The smoke study trains the four variants of `entropy_invariance` for two steps each on
a tiny model; it checks the plumbing (runs, table, JSON, plot), not the numbers. XLA's
backend optimisation is turned off in the subprocess: compiling dominates here.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from experiments import reproduce
from experiments.studies import entropy_invariance
from tests.experiments._smoke import check_png, run_smoke_study

VARIANTS = [name for name, _, _ in entropy_invariance.EI_VARIANTS]
LENGTHS = ["64", "128"]  # the smoke preset's


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return run_smoke_study(tmp_path_factory.mktemp("reproduce"), "entropy_invariance",
                           timeout=300)


@pytest.mark.slow
def test_smoke_study_writes_json_with_every_variant_and_length(smoke_study):
    out, _ = smoke_study
    record = json.loads((out / "entropy_invariance.json").read_text())
    assert record["study"] == "entropy_invariance" and record["seeds"] == [0]
    assert record["preset"] == "smoke" and record["steps"] == 2
    assert record["lengths"] == [int(n) for n in LENGTHS]
    assert list(record["variants"]) == VARIANTS
    for variant in record["variants"].values():
        assert list(variant["accuracy"]) == ["0"]
        assert list(variant["mean"]) == LENGTHS
        assert all(0.0 <= variant["mean"][n] <= 1.0 for n in LENGTHS)
        assert all(variant["std"][n] is None for n in LENGTHS)  # one seed: no spread
        assert "python -m experiments.train --config configs/mlm_extrapolation.py:smoke" \
            in variant["train_commands"]["0"]
        # One value per layer (the smoke model has 1) and length, in [0, log n] nats.
        entropy = variant["attention_entropy"]["0"]
        assert list(entropy) == LENGTHS and all(len(entropy[n]) == 1 for n in LENGTHS)
        assert all(0.0 < entropy[n][0] <= math.log(int(n)) + 1e-4 for n in LENGTHS)
        assert variant["entropy_mean"] == entropy
    assert record["date"] and record["machine"].startswith("cpu")
    assert "--preset smoke" in record["command"]


@pytest.mark.slow
def test_smoke_study_writes_table_and_plot(smoke_study):
    out, result = smoke_study
    table = (out / "entropy_invariance.md").read_text()
    assert "| variant | 64 | 128 |" in table
    for name in VARIANTS:
        row = re.search(rf"^\| {re.escape(name)} \|(.*)\|$", table, re.MULTILINE)
        assert row, f"no row for {name!r} in\n{table}"
        cells = [cell.strip() for cell in row.group(1).split("|")]
        assert len(cells) == 2 and all(re.fullmatch(r"\d+\.\d\d", c) for c in cells), cells
    assert "| variant | layer | 64 | 128 |" in table
    assert "| uniform over the n visible keys (log n) | – | 4.16 | 4.85 |" in table
    assert "![accuracy vs evaluation length](entropy_invariance.png)" in table
    check_png(out / "entropy_invariance.png")
    runs = sorted(p.name for p in (out.parent / "runs" / "entropy_invariance" /
                                   "smoke-2steps").iterdir())
    assert len(runs) == 4 and all((out.parent / "runs" / "entropy_invariance" /
                                   "smoke-2steps" / r / "final_metrics.json").exists()
                                  for r in runs)
    assert "updated" not in result.stdout  # docs/results.md is left alone for other --out


def test_results_block_is_replaced_between_markers_only(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("intro\n<!-- s:begin -->\nold\n<!-- s:end -->\nreading\n")
    assert reproduce._update_results_md(path, "s", "new table")
    assert path.read_text() == "intro\n<!-- s:begin -->\nnew table\n<!-- s:end -->\nreading\n"
    assert not reproduce._update_results_md(path, "other", "x")
    assert not reproduce._update_results_md(tmp_path / "missing.md", "s", "x")


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["no_such_study"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["entropy_invariance", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_unknown_preset_is_rejected_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["entropy_invariance", "--preset", "huge"])
    err = capsys.readouterr().err
    assert "--preset" in err and "'default'" in err and "'smoke'" in err and "'huge'" in err


def test_every_study_module_has_the_interface():
    for name in reproduce.STUDIES:
        study = reproduce.load_study(name)
        assert {"default", "smoke"} <= set(study.PRESETS), name
        assert all(callable(getattr(study, f)) for f in ("run", "plot", "markdown")), name


def test_list_presets_prints_them_as_json(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["entropy_invariance", "--list-presets"])
    assert exit_info.value.code in (0, None)
    assert json.loads(capsys.readouterr().out) == sorted(entropy_invariance.PRESETS)


def test_gpu_preset_is_the_config_files_own_recipe_at_20m_tokens():
    """What the GPU campaign runs: every variant's config passes the checks `train`
    makes, with the config file's model (width 256, 4 layers), 5000 steps of 64 × 64
    bytes (≥ 20M tokens per run), bf16 compute, Amos-style's half-life 2000, evaluated
    at 64 … 4096."""
    from experiments.studies.common import study_config

    config_preset, _, steps = entropy_invariance.PRESETS["gpu"]
    assert entropy_invariance.eval_lengths("gpu") == (64, 128, 256, 512, 1024, 2048, 4096)
    assert entropy_invariance.eval_lengths("default") == entropy_invariance.LENGTHS
    own = study_config(entropy_invariance.MLM_CONFIG, "full", {}).model
    for _, scale, positions in entropy_invariance.EI_VARIANTS:
        overrides = entropy_invariance._ei_overrides("gpu", steps, 1, scale, positions)
        config = study_config(entropy_invariance.MLM_CONFIG, config_preset, overrides)
        for key in ("width", "num_layers", "num_heads", "mlp_dim"):
            assert config.model[key] == own[key]
        assert (config.model.attention_scale, config.objective.positions) == (scale, positions)
        assert config.model.dtype == "bfloat16"
        tokens = config.train.num_steps * config.data.batch_size * config.data.seq_len
        assert tokens >= 20_000_000, tokens
        assert config.optimizer.amos_style.half_life == 2000
        assert tuple(config.eval.lengths) == (64, 128, 256, 512, 1024, 2048, 4096)
        assert config.seed == config.train.seed == config.data.seed == 1


def test_results_block_follows_the_output_folder(tmp_path):
    assert reproduce.results_block(reproduce.DEFAULT_OUT, "rdrop") == ("rdrop", "results")
    assert reproduce.results_block(reproduce.DEFAULT_OUT / "rdrop_overfit", "rdrop") == (
        "rdrop_overfit", "results/rdrop_overfit")
    assert reproduce.results_block(tmp_path, "rdrop") == (None, None)
