"""`benchmarks.lm` / `benchmarks.heads` on tiny shapes: tables, MFU from the measured peak."""

from __future__ import annotations

import itertools
import math

import pytest

from benchmarks import heads, lm

TINY = lm.LMCase("tiny", dict(width=32, num_layers=1, num_heads=2, mlp_dim=64,
                              vocab_size=32, tie_embeddings=True), 2, 16)


def test_matmul_peak_is_the_best_measured_rate():
    peak, size, rows = lm.matmul_peak((64, 128), repeats=2)
    assert [row[0] for row in rows] == ["64 x 64", "128 x 128"]
    rates = [float(row[2]) for row in rows]
    assert peak > 0 and math.isclose(peak / 1e9, max(rates), rel_tol=0.05, abs_tol=0.06)
    assert rows[(64, 128).index(size)][2] == f"{peak / 1e9:.1f}"


def test_mfu_is_achieved_rate_over_the_measured_peak():
    (row,), peak = lm.throughput_rows([TINY], ["adamw"], 1e6, 64, repeats=1)
    assert peak >= 1e6  # the given peak, or the in-loop matmul rate when that is higher
    (row_high,), peak_high = lm.throughput_rows([TINY], ["adamw"], 1e15, 64, repeats=1)
    assert peak_high == 1e15 and row_high[-1] == "0%"
    label, name, shape, params, gflop, ms, tokens_per_s, gflops, mfu = row
    assert (label, name, shape) == ("tiny", "adamw", "2 x 16")
    assert int(params.replace(",", "")) == lm.num_params(TINY)
    assert float(gflop) == pytest.approx(lm.step_flops(TINY) / 1e9, abs=0.006)
    assert lm.step_flops(TINY) == lm.models.flops_per_token(TINY.spec(), seq_len=16) * 32
    achieved = float(gflops) * 1e9
    # The step column is rounded to whole milliseconds: tokens/s must lie in the range
    # that rounding allows (a tiny step takes about a millisecond).
    tokens = float(tokens_per_s.replace(",", ""))
    assert 32 / ((float(ms) + 0.5) / 1e3) <= tokens * 1.001
    assert float(ms) < 0.5 or tokens <= 32 / ((float(ms) - 0.5) / 1e3) * 1.001
    # The table rounds GFLOP/s to 0.1 and MFU to 1%: the MFU must lie in the range the
    # rounded rate allows (a tiny step's rate is a fraction of a GFLOP/s).
    low, high = (100 * max(achieved + d, 0.0) / peak for d in (-0.05e9, 0.05e9))
    assert low - 0.5 <= float(mfu.rstrip("%")) <= high + 0.5


def test_remat_table_and_proof_step():
    rows, (policy, length, seconds, loss) = lm.remat_rows(
        TINY.model, batch=2, start=16, limit=16, budget=2**30, common_len=16, repeats=1,
        policies=("none", "full"))
    assert [row[0] for row in rows] == ["none", "full"]
    # A generous budget: both reach the length limit.
    assert all(row[1] == "16 (limit)" for row in rows)
    assert rows[0][-1] == "1.00x"
    assert (policy, length) == ("none", 16)
    assert seconds > 0 and math.isfinite(loss) and loss > 0


def test_max_length_stops_at_the_budget():
    # A budget below the start length's compiled peak: nothing fits, one length tried.
    length, peak, tried = lm.max_length(TINY.spec(), 2, 16, 64, 1024, lm.remat_options())
    assert (length, peak) == (0, 0)
    assert len(tried) == 1 and tried[0][0] == 16 and tried[0][1] > 1024


@pytest.mark.slow
def test_max_length_bisection_finds_what_a_linear_scan_finds():
    options = lm.remat_options()
    lengths = (16, 32, 64, 128, 256)
    peaks = [lm.compiled_peak_bytes(TINY.spec(), 1, n, options) for n in lengths]
    assert all(a < b for a, b in itertools.pairwise(peaks)), peaks
    for longest in (0, 2, 4):  # the budget admits lengths[:longest + 1]
        length, peak, tried = lm.max_length(TINY.spec(), 1, 16, 256, peaks[longest], options)
        assert (length, peak) == (lengths[longest], peaks[longest])
        assert dict(tried) == {n: peaks[lengths.index(n)] for n, _ in tried}
        # start, limit, then halving the 3 undecided lengths: fewer than a linear scan.
        assert len(tried) <= 4


def test_max_length_tries_nothing_after_the_deadline():
    length, peak, tried = lm.max_length(TINY.spec(), 1, 16, 256, 2**30, lm.remat_options(),
                                        deadline=0.0)
    assert (length, peak, tried) == (0, 0, [])


def test_head_rows_count_parameters():
    width, types, head_dim = 16, 3, 4
    rows = heads.head_rows((8,), batch=1, width=width, types=types, head_dim=head_dim,
                           repeats=1)
    assert [row[1] for row in rows] == ["GlobalPointer", "Efficient GP"]
    dense = 2 * (width * types * head_dim + types * head_dim)
    efficient = 2 * (width * head_dim + head_dim) + 2 * (2 * head_dim * types + types)
    assert [int(row[2].replace(",", "")) for row in rows] == [dense, efficient]
    assert all(float(row[3]) > 0 for row in rows)


def test_accelerator_case_is_gpt2_small_sized():
    """The GPU/TPU case is the ~125M-parameter LM issue 8 asks for (built abstractly here)."""
    from benchmarks import lm

    case = lm.LMCase("gpt", lm.gpt_125m(), 16, 1024)
    assert 120e6 < lm.num_params(case) < 130e6
    assert case.model["dtype"] == "bfloat16"
