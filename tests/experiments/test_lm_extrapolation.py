"""`python -m experiments.reproduce lm_extrapolation` on the smoke preset (a subprocess).

Trains both attention scales for two steps on a tiny decoder and checks the plumbing
(runs, JSON, table, plot), not the numbers. XLA's backend optimisation is turned off
in the subprocess: compiling dominates here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from experiments.studies import lm_extrapolation
from tests.experiments._smoke import check_png, run_smoke_study

LENGTHS = ["64", "128", "256", "512", "1024"]
VARIANTS = [name for name, _ in lm_extrapolation.VARIANTS]


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return run_smoke_study(tmp_path_factory.mktemp("lm_extrapolation"), "lm_extrapolation",
                           timeout=300)


@pytest.mark.slow
def test_smoke_study_writes_json_with_both_scales_and_every_length(smoke_study):
    out, _ = smoke_study
    record = json.loads((out / "lm_extrapolation.json").read_text())
    assert record["study"] == "lm_extrapolation" and record["seeds"] == [0]
    assert record["preset"] == "smoke" and record["steps"] == 2
    assert record["train_length"] == 64 and record["lengths"] == [int(n) for n in LENGTHS]
    assert list(record["variants"]) == VARIANTS
    assert [v["attention_scale"] for v in record["variants"].values()] == [
        "standard", "entropy_invariant"]
    # Every length scores the same bytes (1 batch of 8 windows of 1024); the tail a quarter.
    assert record["tokens_scored"]["whole"] == {n: 8 * 1024.0 for n in LENGTHS}
    assert record["tokens_scored"]["tail"] == {n: 2 * 1024.0 for n in LENGTHS}
    for variant in record["variants"].values():
        for key in ("mean", "tail_mean"):
            assert list(variant[key]) == LENGTHS
            # two steps from a uniform init: close to log2(259) bits per byte
            assert all(6.0 < variant[key][n] < 9.0 for n in LENGTHS), variant[key]
        assert all(variant["std"][n] is None for n in LENGTHS)  # one seed: no spread
        assert "python -m experiments.train --config configs/lm_stdlib.py:smoke" \
            in variant["train_commands"]["0"]
        assert "--config.eval.lengths=(64,128,256,512,1024)" in variant["train_commands"]["0"]
    assert record["date"] and record["machine"].startswith("cpu")


@pytest.mark.slow
def test_smoke_study_writes_table_and_plot(smoke_study):
    out, result = smoke_study
    table = (out / "lm_extrapolation.md").read_text()
    assert "| variant | positions | 64 | 128 | 256 | 512 | 1024 |" in table
    for name in VARIANTS:
        for part in ("whole window", "tail (last quarter)"):
            row = re.search(rf"^\| {re.escape(name)} \| {re.escape(part)} \|(.*)\|$", table,
                            re.MULTILINE)
            assert row, f"no row for {name!r}, {part!r} in\n{table}"
            cells = [cell.strip() for cell in row.group(1).split("|")]
            assert len(cells) == 5 and all(re.fullmatch(r"\d+\.\d{3}", c) for c in cells)
    assert "| bytes scored | whole / tail | 8192 / 2048 |" in table
    assert "![bits per byte vs evaluation length](lm_extrapolation.png)" in table
    check_png(out / "lm_extrapolation.png")
    runs = out.parent / "runs" / "lm_extrapolation" / "smoke-2steps"
    assert sorted(p.name for p in runs.iterdir()) == ["entropy_invariant-seed0",
                                                      "standard-seed0"]
    assert all((runs / r / "final_metrics.json").exists() for r in
               ("entropy_invariant-seed0", "standard-seed0"))
    assert "updated" not in result.stdout  # docs/results.md is left alone for other --out


def test_gpu_preset_trains_the_config_files_model_on_20m_tokens():
    """Every variant's config passes the checks `train` makes, with the model of
    `configs/lm_stdlib.py`, 5000 steps of 64 windows of 64 bytes (≥ 20M tokens per run),
    bf16 compute, evaluated at 64 … 4096 (each length dividing the longest)."""
    from experiments.studies.common import study_config

    config_preset, _, steps = lm_extrapolation.PRESETS["gpu"]
    own = study_config(lm_extrapolation.LM_CONFIG, "full", {}).model
    for _, scale in lm_extrapolation.VARIANTS:
        overrides = lm_extrapolation._overrides("gpu", steps, 0, scale)
        config = study_config(lm_extrapolation.LM_CONFIG, config_preset, overrides)
        for key in ("width", "num_layers", "num_heads", "mlp_dim", "norm", "rope_layout"):
            assert config.model[key] == own[key]
        assert (config.model.attention_scale, config.model.dtype) == (scale, "bfloat16")
        tokens = config.train.num_steps * config.data.batch_size * config.data.seq_len
        assert config.data.seq_len == lm_extrapolation.TRAIN_LENGTH and tokens >= 20_000_000
        assert tuple(config.eval.lengths) == (64, 128, 256, 512, 1024, 2048, 4096)
