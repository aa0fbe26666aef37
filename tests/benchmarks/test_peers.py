"""`benchmarks.peers`: kexue's RoFormer MLM step against HF Transformers' on a tiny config.

The kexue side always runs; the PyTorch side only where torch and transformers import
(the `peers` extra, not installed in CI).
"""

from __future__ import annotations

import itertools
import math

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
    assert result.kexue_ms > 0 and math.isnan(result.eager_ms)
    # One table after each config, then all of them: here one config, so twice one row.
    rows = [row for row in _table_rows(out) if TINY.describe() in row]
    assert len(rows) == 2 and rows[0] == rows[1], out
    assert f"{result.kexue_params:,} / —" in rows[0] and f"| {result.kexue_ms:.1f} |" in rows[0]
    assert "torch not run" in out


def test_torch_side_matches_parameters_and_logits():
    pytest.importorskip("torch", reason="torch is not installed (the `peers` extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the `peers` "
                        "extra)")
    import torch

    torch.set_num_threads(1)
    batch = peers.make_batch(TINY)
    side = peers.TorchSide(TINY, batch, compiled=False)
    abstract = nnx.eval_shape(lambda: models.build_model(
        {"model": peers.kexue_model_config(TINY)}, rngs=nnx.Rngs(0)))
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
    (result.eager_ms,) = (1e3 * t for t in interleaved_median_times([side.step], repeats=1,
                                                                     warmup=0))
    assert result.eager_ms > 0
    row = next(line for line in peers.results_table([result]).splitlines()
               if line.startswith("| tiny"))
    assert f"{result.kexue_params:,} / {result.torch_params:,}" in row
    assert f"| {result.eager_ms:.1f} |" in row  # kexue's step is timed in the other test
