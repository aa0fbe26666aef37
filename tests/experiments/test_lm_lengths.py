"""Causal-LM evaluation at several lengths (`eval.lengths` of an lm config).

A tiny untrained decoder on the stdlib byte corpus: the per-length and tail losses
the task's `eval_fn` reports must equal a direct computation with the model on the
windows the data pipeline cuts at that length, over the same text; bad
`eval.lengths` fail in `check_config` naming the key.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _build
from kexue.data import make_dataset
from kexue.parallel import mesh_from_config

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (8, 16, 32)
EVAL_BATCHES = 2


def _config(**overrides):
    spec = importlib.util.spec_from_file_location("lm_config", ROOT / "configs/lm_stdlib.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flat = {"model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
            "model.mlp_dim": 32, "data.seq_len": 16, "data.batch_size": 8,
            "data.eval_batches": EVAL_BATCHES, "eval.lengths": LENGTHS, **overrides}
    config = module.get_config("smoke")
    config.update_from_flattened_dict(flat)
    return _build.resolve_config(config, module.PRESETS, flat)


@pytest.fixture(scope="module")
def evaluated():
    config = _config()
    _build.check_config(config)
    task = _build.build_task(config, mesh_from_config(config))
    model = task.model_factory()
    (stacked,) = task.eval_data()
    _, metrics = jax.jit(lambda batch: task.eval_fn(model, batch, None))(stacked)
    return task, model, stacked, {k: float(v) for k, v in jax.device_get(metrics).items()}


def _direct(model, config, length: int, batches: int) -> dict[str, float]:
    """NLL sums over the first `batches` batches of the pipeline's windows of `length`."""
    data = config.copy_and_resolve_references()
    data.data.eval_batches = batches
    sums = {"nll": 0.0, "tokens": 0.0, "tail_nll": 0.0, "tail_tokens": 0.0}
    for batch in make_dataset(data, "eval", seq_len=length):
        tokens, weights = batch["tokens"], batch["weights"].astype(np.float64)
        logits = np.asarray(model(jnp.asarray(tokens[:, :-1])), np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(-1))
        target = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        nll = (log_z - target) * weights
        tail = np.arange(length) >= 3 * length // 4
        sums["nll"] += nll.sum()
        sums["tokens"] += weights.sum()
        sums["tail_nll"] += nll[:, tail].sum()
        sums["tail_tokens"] += weights[:, tail].sum()
    return sums


@pytest.mark.parametrize("length", LENGTHS)
def test_per_length_losses_equal_a_direct_computation(evaluated, length):
    task, model, _, metrics = evaluated
    # The windows of `length` that cover the text of the longest length's windows.
    sums = _direct(model, task.config, length, EVAL_BATCHES * max(LENGTHS) // length)
    assert metrics[f"tokens_{length}"] == sums["tokens"] > 0
    assert metrics[f"tokens_tail_{length}"] == sums["tail_tokens"] > 0
    loss, tail = sums["nll"] / sums["tokens"], sums["tail_nll"] / sums["tail_tokens"]
    np.testing.assert_allclose(metrics[f"loss_{length}"], loss, rtol=2e-5)
    np.testing.assert_allclose(metrics[f"loss_tail_{length}"], tail, rtol=2e-5)
    np.testing.assert_allclose(metrics[f"bits_per_byte_{length}"], loss / math.log(2),
                               rtol=2e-5)
    np.testing.assert_allclose(metrics[f"perplexity_{length}"], math.exp(loss), rtol=5e-5)
    np.testing.assert_allclose(metrics[f"perplexity_tail_{length}"], math.exp(tail),
                               rtol=5e-5)


def test_every_length_scores_the_same_targets_and_training_length_keys_stay(evaluated):
    task, model, stacked, metrics = evaluated
    assert {float(metrics[f"tokens_{n}"]) for n in LENGTHS} == {EVAL_BATCHES * 8 * max(LENGTHS)}
    assert metrics["tokens_tail_8"] == metrics["tokens_8"] / 4  # ⌊3·8/4⌋ = 6: 2 of 8
    # `eval/loss` and `bits_per_byte` are still over windows of data.seq_len = 16.
    assert stacked["eval"]["tokens"].shape == (8, EVAL_BATCHES, 17)
    assert metrics["tokens"] == EVAL_BATCHES * 8 * 16
    sums = _direct(model, task.config, 16, EVAL_BATCHES)
    assert metrics["tokens"] == sums["tokens"]
    np.testing.assert_allclose(metrics["bits_per_byte"],
                               sums["nll"] / sums["tokens"] / math.log(2), rtol=2e-5)


def test_without_lengths_the_lm_eval_is_unchanged():
    config = _config()
    del config.eval["lengths"]
    _build.check_config(config)
    task = _build.build_task(config, mesh_from_config(config))
    (stacked,) = task.eval_data()
    assert set(stacked) == {"eval"}
    _, metrics = task.eval_fn(task.model_factory(), stacked, None)
    assert set(metrics) == {"bits_per_byte", "tokens"}


@pytest.mark.parametrize("value", [(), (0, 16), (16, -8), (16, 16), (8.0, 16), (True,),
                                   (24, 16)])
def test_bad_eval_lengths_raise_naming_the_key(value):
    config = _config()
    config.eval.lengths = value
    with pytest.raises(ValueError, match=r"config key `eval\.lengths`"):
        _build.check_config(config)
