"""Stop a run cleanly on SIGTERM / SIGINT: finish the step, save, exit 0.

    with PreemptionGuard() as guard:
        for step in ...:
            state, metrics = train_step(state, batch)
            if guard.should_stop(step):
                save(); break

A single process installs handlers for SIGTERM and SIGINT that only set a flag (a
second SIGINT raises `KeyboardInterrupt`, for an impatient Ctrl-C). In a multi-process
job every process must stop at the same step: where JAX's preemption service runs
(`jax.distributed` with `jax_enable_preemption_service`, on by default) JAX itself
receives the notice, and `multihost_utils.reached_preemption_sync_point(step)` tells
all processes together; otherwise the processes OR their local flags with a small
all-gather at every check.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["PreemptionGuard"]


def _jax_sync_manager_available() -> bool:
    try:
        from jax._src import distributed
    except ImportError:
        return False
    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class PreemptionGuard:
    """Context manager watching for a preemption notice (see the module doc).

    Args:
      signals: the signals treated as a notice in a single process.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._use_jax_sync = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> PreemptionGuard:
        self._use_jax_sync = jax.process_count() > 1 and _jax_sync_manager_available()
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if self._use_jax_sync and signum == signal.SIGTERM:
                    continue  # JAX's preemption notifier owns SIGTERM
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True when every process should save at `step` and stop (a collective)."""
        if jax.process_count() == 1:
            return self.received is not None
        if self._use_jax_sync and multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or "preemption notice"
            return True
        flags = multihost_utils.process_allgather(
            np.array([self.received is not None], np.int32))
        if np.any(flags):
            self.received = self.received or "preemption notice (another process)"
            return True
        return False
