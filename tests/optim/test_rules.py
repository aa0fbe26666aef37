"""Per-tensor rules: paths, regex rules, the safe expression evaluator, init-derived scales."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kexue import optim


def test_paths_of_dicts_lists_and_nnx_state():
    tree = {"encoder": [{"kernel": np.zeros((2, 3))}, {"bias": np.zeros(3)}], "scale": 1.0}
    assert optim.parameter_paths(tree) == {
        "encoder/0/kernel": (2, 3), "encoder/1/bias": (3,), "scale": ()}
    state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
    assert optim.parameter_paths(state) == {"bias": (4,), "kernel": (3, 4)}


def test_first_matching_regex_wins_and_expressions_see_the_shape(rng):
    fan_in, fan_out = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    rule = optim.eta_fn_from_rules([
        ("^head/", 0.01),
        ("kernel$", "1/sqrt(fan_in)"),
        ("embedding", "sqrt(2 / (SHAPE[0] + SHAPE[-1]))"),
        (".*", 0.5),
    ])
    assert rule("head/kernel", (fan_in, fan_out)) == 0.01
    assert rule("block/kernel", (fan_in, fan_out)) == pytest.approx(1 / math.sqrt(fan_in))
    assert rule("block/kernel", (2, 3, fan_in, fan_out)) == pytest.approx(
        1 / math.sqrt(6 * fan_in))
    assert rule("embedding", (fan_in, fan_out)) == pytest.approx(
        math.sqrt(2 / (fan_in + fan_out)))
    assert rule("norm/scale", (fan_out,)) == 0.5
    shape_rule = optim.shape_fn_from_rules([
        ("kernel", "(1,) + SHAPE[1:]"), ("embedding", ()), ("", "SHAPE")])
    assert shape_rule("x/kernel", (fan_in, fan_out)) == (1, fan_out)
    assert shape_rule("embedding", (fan_in, fan_out)) == ()
    assert shape_rule("bias", (fan_out,)) == (fan_out,)


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')",
    "SHAPE.__class__",
    "[d for d in SHAPE]",
    "open('/etc/passwd')",
    "'a' * 3",
    "lambda: 1",
    "sqrt(x=4)",
    "globals()",
    "1e308 ** 2",
    "1 / (size - size)",
    "SHAPE[5]",
    "1" * 300,
])
def test_unsafe_or_failing_expressions_raise_naming_the_path(expression):
    rule = optim.eta_fn_from_rules([("kernel", expression)])
    with pytest.raises(ValueError, match=r"'dense/kernel'"):
        rule("dense/kernel", (3, 4))


def test_bad_rules_fail_when_built():
    with pytest.raises(ValueError, match="not valid"):
        optim.eta_fn_from_rules([("kernel", "1/sqrt(")])
    with pytest.raises(ValueError, match="does not compile"):
        optim.eta_fn_from_rules([("kernel[", 0.5)])
    with pytest.raises(ValueError, match="positive"):
        optim.eta_fn_from_rules([("kernel", -0.5)])
    with pytest.raises(ValueError, match="pairs"):
        optim.eta_fn_from_rules(["kernel"])


def test_rules_from_a_config_dict_tuple_of_pairs():
    config = ml_collections.ConfigDict()
    config.eta_rules = (("kernel$", "1/sqrt(fan_in)"), ("bias$", 0.5))
    config.slot_rules = (("kernel$", "(1, fan_out)"), (".", "SHAPE"))
    eta = optim.eta_fn_from_rules(config.eta_rules)
    assert eta("mlp/kernel", (16, 4)) == pytest.approx(0.25)
    assert eta("mlp/bias", (4,)) == 0.5
    with pytest.raises(ValueError, match=r"no scale rule matches parameter 'norm/scale'"):
        eta("norm/scale", (4,))
    assert optim.shape_fn_from_rules(config.slot_rules)("mlp/kernel", (16, 4)) == (1, 4)
    # A mapping works too (iterated in its own order).
    assert optim.eta_fn_from_rules({"bias$": 0.1})("b/bias", (2,)) == 0.1


def test_eta_from_init_reads_std_and_half_for_zero_or_one(rng):
    kernel = rng.normal(size=(64, 32)) * 0.05
    params = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros(32),
              "scale": jnp.ones(32), "temperature": jnp.full((), 10.0)}
    rule = optim.eta_fn_from_init(params)
    assert rule("kernel", (64, 32)) == pytest.approx(np.std(kernel), rel=1e-5)
    assert rule("bias", (32,)) == 0.5 and rule("scale", (32,)) == 0.5
    with pytest.raises(ValueError, match=r"'temperature'.*constant 10"):
        rule("temperature", ())
    with pytest.raises(ValueError, match=r"'missing'"):
        rule("missing", (3,))
    with pytest.raises(ValueError, match=r"'kernel' has shape \(32, 64\)"):
        rule("kernel", (32, 64))
    overridden = optim.eta_fn_from_rules([("temperature", 1.0)], fallback=rule)
    assert overridden("temperature", ()) == 1.0 and overridden("bias", (32,)) == 0.5


def test_reduce_largest_axes():
    shape_fn = optim.reduce_largest_axes()
    assert shape_fn("w", (768, 3072)) == (768, 1)
    assert shape_fn("w", (32000, 768)) == (1, 768)
    assert shape_fn("w", (4, 4)) == (1, 4)
    assert shape_fn("b", (4096,)) == (4096,)
    assert shape_fn("s", ()) == ()
    assert optim.reduce_largest_axes(2)("c", (2, 8, 4)) == (2, 1, 1)
    assert optim.reduce_largest_axes(5)("c", (2, 8, 4)) == (2, 1, 1)  # keeps one axis
    assert optim.reduce_largest_axes(min_size=100)("w", (64, 32)) == (64, 32)
    with pytest.raises(ValueError, match="num_axes"):
        optim.reduce_largest_axes(0)


def test_slot_shape_rule_results_are_checked():
    rule = optim.shape_fn_from_rules([("kernel", "(2, fan_out)")])
    with pytest.raises(ValueError, match=r"'dense/kernel' \(shape \(3, 4\)\)"):
        rule("dense/kernel", (3, 4))
