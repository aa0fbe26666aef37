"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax


def machine_description() -> str:
    """One line naming the machine the numbers were taken on."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    cpu = platform.processor() or platform.machine()
    try:
        import os

        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = None
    return (
        f"{jax.default_backend()} ({', '.join(kinds)}; {len(devices)} device(s)); host {cpu}, "
        f"{cores} core(s); jax {jax.__version__}"
    )


def today() -> str:
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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
