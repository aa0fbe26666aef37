"""Shared pytest set-up.

* Eight virtual CPU devices, so sharding code is exercised without accelerators.
  Must run before JAX initialises its backends, hence at import time here.
* `rng`: a NumPy generator with a fresh seed for every test. The seed is printed in
  the report of a failing test; set KEXUE_TEST_SEED=<seed> to replay it.
* Hypothesis runs without deadlines (first calls include XLA compilation).
* `CLUENER_DIR`: where tests find the CLUENER 2020 JSON lines: `$KEXUE_CLUENER_DIR`,
  else `../shared/data/cluener` next to the repository (the project machine's copy).
  Tests that need it skip with this path in the reason when it is absent.
* Tests marked `slow` (the long smoke runs) start first: with `-n 2` the workers then
  end on short tests and finish together, rather than one idling while the other runs
  a long test that happened to be collected last.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# The suite's programs are small and run a few times each, so compiling is most of its
# time: XLA:CPU's LLVM optimisation is off (as in the campaign's --smoke). Tests that
# measure speed do so in benchmarks, not here.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("kexue", deadline=None, max_examples=30, derandomize=False)
settings.register_profile("ci", deadline=None, max_examples=30, derandomize=False,
                          print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "kexue")

CLUENER_DIR = os.environ.get("KEXUE_CLUENER_DIR") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cluener"))
HAVE_CLUENER = os.path.isfile(os.path.join(CLUENER_DIR, "train.jsonl"))
CLUENER_MISSING = (f"CLUENER JSON lines not found in {CLUENER_DIR} "
                   "(set KEXUE_CLUENER_DIR to a copy of the dataset)")

_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random generator; the seed is reported if the test fails."""
    env_seed = os.environ.get("KEXUE_TEST_SEED")
    seed = int(env_seed) if env_seed else int(np.random.SeedSequence().entropy % (2**63))
    request.node.stash[_SEED_KEY] = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(("random seed", f"replay with KEXUE_TEST_SEED={seed}"))
    return report


def pytest_collection_modifyitems(config, items):
    """Longest first: the `slow` tests, in collection order, then the rest (stable)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
