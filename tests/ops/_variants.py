"""`chex.variants` for the ops tests: a `chex.TestCase` that also gets the suite's `rng`.

A test method decorated with `@chex.variants(with_jit=True, without_jit=True)` runs
twice, calling the op through `self.variant(fn)`: once under `jax.jit` and once
eagerly, so every reference and property check holds for both. `self.rng` is the
fresh-seeded generator of tests/conftest.py (its seed is reported on failure).
Parametrise with `absl.testing.parameterized`, under the variants decorator; a
hypothesis test takes `@settings(max_examples=VARIANT_EXAMPLES)` under it, so its two
variants together draw the suite's usual 30 examples.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

#: Hypothesis examples per variant of a property test (half the suite's profile).
VARIANT_EXAMPLES = 15


class OpsTestCase(chex.TestCase):
    rng: np.random.Generator

    @pytest.fixture(autouse=True)
    def _fresh_rng(self, rng):
        self.rng = rng
