"""`benchmarks.peers`: kexue's RoFormer MLM step against HF Transformers' on a tiny config.

The kexue side always runs; the PyTorch side only where torch and transformers import
(the `peers` extra, not installed in CI).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flax import nnx

from benchmarks import peers
from benchmarks.common import interleaved_median_times
from kexue import models

TINY = peers.QUICK[0]


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_quick_kexue_only_prints_losses_and_table(capsys):
    results = peers.main(["--quick", "--no-torch", "--repeats", "1"])
    out = capsys.readouterr().out
    (result,) = results
    losses = result.losses["kexue"]
    # Initial logits are tiny (init std 0.02), so the loss starts near log V ...
    assert abs(losses[0] - math.log(TINY.vocab)) < 0.2, losses
    # ... and AdamW on one fixed batch lowers it step after step.
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    # The head at the masked positions only: the same losses (same init, same gradients).
    np.testing.assert_allclose(result.losses["kexue masked"], losses, rtol=1e-5)
    assert result.time("kexue") > 0 and result.time("kexue", "masked") > 0
    assert math.isnan(result.time("torch eager"))
    # One table after each config, then all of them: here one config, so each head's
    # row twice; no product table without the torch side.
    for head in peers.HEADS:
        rows = [row for row in _table_rows(out) if TINY.describe() in row
                and f"| {head} positions |" in row]
        assert len(rows) == 2 and rows[0] == rows[1], out
        assert f"{result.kexue_params:,} / —" in rows[0]
        assert f"| {result.time('kexue', head):.1f} |" in rows[0]
    assert "torch not run" in out and "as shipped" not in out


def test_heads_argument_is_checked():
    with pytest.raises(ValueError, match="`--heads`: expected a comma-separated subset"):
        peers.main(["--quick", "--no-torch", "--heads", "all,everywhere"])


def test_torch_side_matches_parameters_and_logits():
    pytest.importorskip("torch", reason="torch is not installed (the `peers` extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the `peers` "
                        "extra)")
    import torch

    torch.set_num_threads(1)
    batch = peers.make_batch(TINY)
    side = peers.TorchSide(TINY, batch, compiled=False)
    abstract = nnx.eval_shape(lambda: models.build_model(
        peers.kexue_model_spec(TINY), rngs=nnx.Rngs(0)))
    result = peers.Result(TINY, models.count_params(abstract), side.params,
                          side.type_vocab_params)
    # Equal trainable parameters but HF's one token-type row (raises otherwise).
    peers.check_params(result)
    assert result.torch_params - result.kexue_params == TINY.width
    # Same weights give the same logits: the architectures agree.
    difference = peers.max_logit_difference(TINY, batch)
    assert difference < 1e-5, difference
    losses = [side.step() for _ in range(3)]
    assert abs(losses[0] - math.log(TINY.vocab)) < 0.2, losses
    assert losses[2] < losses[1] < losses[0], losses
    # The hand-written gather around HF's modules: the same losses step by step.
    masked = peers.TorchSide(TINY, batch, compiled=False, masked_only=True)
    np.testing.assert_allclose([masked.step() for _ in range(3)], losses, rtol=1e-5)
    (eager,) = (1e3 * t for t in interleaved_median_times([side.step], repeats=1, warmup=0))
    result.ms = {"kexue masked": 1.0, "torch eager": eager}
    lines = peers.results_table([result]).splitlines()
    row = next(line for line in lines if line.startswith("| tiny"))
    assert f"{result.kexue_params:,} / {result.torch_params:,}" in row
    assert f"| masked positions | {result.kexue_params:,}" in row
    product = next(line for line in peers.product_table([result]).splitlines()
                   if line.startswith("| tiny"))
    assert f"| 1.0 | {eager:.1f} | — | {eager:.2f}x | — |" in product


def test_dots_table_rates_every_matmul_shape():
    table = peers.dots_table(TINY, repeats=1, use_torch=False)
    rows = _table_rows(table)[1:]  # after the header
    assert [row.split("|")[1].strip() for row in rows] == [n for n, *_ in peers.dot_shapes(TINY)]
    for row in rows:
        xla, torch_rate = (cell.strip() for cell in row.split("|")[3:5])
        assert float(xla) > 0 and torch_rate == "—"
