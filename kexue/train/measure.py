"""Timing and provenance for benchmarks and studies: medians of interleaved calls, and
one line naming the machine the numbers came from.

    fast, slow = interleaved_median_times([step_a, step_b], repeats=20)
    record = {"date": today(), "machine": machine_description(), "ratio": slow / fast}
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax

__all__ = ["interleaved_median_times", "machine_description", "today"]


def machine_description() -> str:
    """One line naming the backend, devices, host CPU, cores and JAX version."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    cpu = platform.processor() or platform.machine()
    try:
        cores: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return (f"{jax.default_backend()} ({', '.join(kinds)}; {len(devices)} device(s)); "
            f"host {cpu}, {cores} core(s); jax {jax.__version__}")


def today() -> str:
    """The date as YYYY-MM-DD."""
    return datetime.date.today().isoformat()


def interleaved_median_times(fns: Sequence[Callable[[], object]], *, repeats: int = 20,
                             warmup: int = 2) -> list[float]:
    """Median wall time (seconds) of each zero-argument function.

    The functions run in turn inside one loop (a, b, a, b, ...) so that a change in
    machine load hits all of them alike; ratios between them are what to trust.
    Each call's result is blocked on, so asynchronous dispatch is timed fully.
    """
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]
