"""`python -m benchmarks.attention --smoke`: rows, JSON file and the tables rendered from it."""

from __future__ import annotations

import json

from benchmarks import attention


def test_smoke_run_writes_json_and_tables(tmp_path, capsys):
    path = tmp_path / "attention.json"
    results = attention.main(["--smoke", "--out", str(path)])
    written = json.loads(path.read_text())
    assert written["rows"] == results["rows"]
    lengths = attention.SMOKE["lengths"]
    assert [(row["n"], row["mask"]) for row in written["rows"]] == [
        (n, mask) for n in lengths for mask in attention.MASKS]
    for row in written["rows"]:
        for name in attention.IMPLEMENTATIONS:
            assert row[f"{name}_peak_bytes"] > 0
            assert row[f"{name}_seconds"] > 0  # the smoke budget runs everything
    lm_result = written["lm"]
    for name in attention.IMPLEMENTATIONS:
        assert lm_result[name]["length"] == attention.SMOKE["lm"]["limit"]
        assert 0 < lm_result[name]["peak_bytes"] <= lm_result["budget_bytes"]
    assert lm_result["proof"]["loss"] > 0
    assert [(row["batch"], row["length"], row["implementation"])
            for row in written["lm_steps"]] == [(2, 32, "dense"), (2, 32, "blocked")]
    assert all(row["seconds"] > 0 for row in written["lm_steps"])
    printed = capsys.readouterr().out
    attention.main(["--markdown", str(path)])
    again = capsys.readouterr().out
    assert attention.markdown(written) in printed and again.strip() == attention.markdown(
        written).strip()
    assert "| n | mask | dense peak MiB | blocked peak MiB |" in again
    assert again.count("\n| 64 |") == 2


def test_crossover_and_growth_exponent():
    rows = [{"n": n, "mask": mask, "dense_peak_bytes": n * n, "blocked_peak_bytes": 10 * n,
             "dense_seconds": dense, "blocked_seconds": blocked}
            for n, dense, blocked in ((128, 1.0, 2.0), (256, 2.0, 1.5), (512, None, 3.0))
            for mask in attention.MASKS]
    assert attention.crossover(rows) == 256
    assert attention.growth_exponent(rows, "blocked", "causal") == 1.0
    assert attention.growth_exponent(rows, "dense", "causal") == 2.0


def test_block_sizes_table(tmp_path, capsys):
    path = tmp_path / "blocks.json"
    results = attention.main(["--smoke", "--block-sizes", "--out", str(path)])
    assert json.loads(path.read_text()) == results
    assert [(row["block_q"], row["block_k"], row["mask"]) for row in results["blocks"]] == [
        (*blocks, mask) for blocks in attention.BLOCK_SIZES for mask in attention.MASKS]
    assert all(row["seconds"] > 0 and row["peak_bytes"] > 0 for row in results["blocks"])
    capsys.readouterr()
    attention.main(["--markdown", str(path)])
    table = capsys.readouterr().out
    assert "| block_q x block_k | mask | peak MiB | ms | vs fastest |" in table
    assert table.count("1.00x") >= 2  # the fastest of each mask
