"""Metric writers (`metrics.jsonl`, TensorBoard without TensorFlow) and a progress bar.

    writer = MetricWriter(workdir, resume_step=step)   # process 0 writes, others no-op
    writer.write(step, {"loss": 0.71, "tokens_per_s": 5.2e4}, prefix="train")
    writer.close()
    bar = ProgressBar(total_steps, initial=step)
    bar.update(step, loss=0.71, **{"tokens/s": 5.2e4})

`metrics.jsonl` holds one JSON object per line: `{"step": s, "time": t, "split":
"train", "loss": ...}`. On resume, records after the restored step (written by the
interrupted run after its last checkpoint) are dropped, and TensorBoard purges them
too (`purge_step`), so the curves of a resumed run equal an uninterrupted one. Lines
that are not a JSON object with an integer `step` (a line cut by a kill, a damaged
file) are moved to `metrics.jsonl.unreadable` and reported, never a reason to fail.
TensorBoard event files are written by `tensorboardX` into `<workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import numpy as np

__all__ = ["JsonlWriter", "MetricWriter", "ProgressBar", "TensorBoardWriter",
           "format_duration", "format_number", "scalars"]


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Plain Python floats (ints stay ints) from a dict of scalar arrays."""
    out: dict[str, float] = {}
    for name, value in jax.device_get(dict(metrics)).items():
        value = np.asarray(value)
        out[name] = int(value) if np.issubdtype(value.dtype, np.integer) else float(value)
    return out


class JsonlWriter:
    """Appends one JSON record per `write` to `path`, flushing each line.

    Args:
      path: the file (directories are created).
      resume_step: if given, existing records with `step > resume_step` are dropped,
        and unreadable lines are moved to `<path>.unreadable`.
      log: receives a line naming the unreadable lines, if any.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None,
                 log: Callable[[str], None] | None = None):
        self.path = os.fspath(path)
        self.log = log
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept, unreadable, numbers = [], [], []
        with open(self.path, "rb") as file:
            lines = file.read().splitlines()
        for number, raw in enumerate(lines, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
                at = int(record["step"]) if isinstance(record, dict) else None
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                at = None
            if at is None:
                if raw.strip():
                    unreadable.append(raw + b"\n")
                    numbers.append(number)
            elif at <= step:
                kept.append(raw + b"\n")
        if unreadable:
            with open(self.path + ".unreadable", "ab") as file:
                file.writelines(unreadable)
            shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
            message = (f"{self.path}: {len(numbers)} unreadable line(s) (line {shown}: not a "
                       f"JSON object with a step) moved to {self.path}.unreadable")
            (self.log or (lambda text: print(f"[kexue.train] {text}", flush=True)))(message)
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as file:
            file.writelines(kept)
        os.replace(temporary, self.path)

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
        record = {"step": int(step), "time": round(time.time(), 3), "split": prefix,
                  **{name: _json_number(value) for name, value in scalars(metrics).items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _json_number(value: float) -> float | str:
    """JSON has no NaN/Inf: those are written as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class TensorBoardWriter:
    """Scalars as TensorBoard event files via `tensorboardX` (no TensorFlow needed)."""

    def __init__(self, logdir: str | os.PathLike, *, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(logdir=os.fspath(logdir), purge_step=purge, flush_secs=10)

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
        for name, value in scalars(metrics).items():
            self._writer.add_scalar(f"{prefix}/{name}", value, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricWriter:
    """`metrics.jsonl` and TensorBoard events under `workdir`, written by process 0 only."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 tensorboard: bool = True, log: Callable[[str], None] | None = None):
        self._writers: list[Any] = []
        if jax.process_index() != 0:
            return
        self._writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl"),
                                         resume_step=resume_step, log=log))
        if tensorboard:
            self._writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard"),
                                                   resume_step=resume_step))

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
        for writer in self._writers:
            writer.write(step, metrics, prefix=prefix)

    def close(self) -> None:
        """Closes every writer (all are tried); the first error is raised after."""
        errors = []
        for writer in self._writers:
            try:
                writer.close()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]


def format_duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s`, `6s`; `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def format_number(value: float) -> str:
    """One format for every number the loop prints: `21,239` (ints, and floats of
    magnitude ≥ 1000, rounded), else four significant digits (`5.345`, `0.0002613`,
    `9.8e-05`); `nan` / `inf` as such."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"{int(value):,}"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


class ProgressBar:
    """`step 120/1000 [##----] 12% loss 0.7132 tokens/s 52,100 ETA 3m10s`.

    On a terminal the line is redrawn in place; in a log (not a TTY) a full line is
    printed on each `update`, so call it at the logging interval. Process 0 only.

    Args:
      total: the last step.
      initial: the step the run starts (or resumes) from; ETA uses only steps run now.
      stream: where to write (default stdout).
      width: characters of the bar itself.
    """

    def __init__(self, total: int, *, initial: int = 0, stream: TextIO | None = None,
                 width: int = 20):
        self.total, self.initial, self.width = int(total), int(initial), width
        self.stream = sys.stdout if stream is None else stream
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = jax.process_index() == 0
        self._start = time.perf_counter()
        self._drawn = False

    def line(self, step: int, **values: float) -> str:
        fraction = min(max(step / self.total, 0.0), 1.0) if self.total else 1.0
        filled = round(fraction * self.width)
        elapsed = time.perf_counter() - self._start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else math.inf
        fields = " ".join(f"{name} {format_number(value)}" for name, value in values.items())
        return (f"step {step}/{self.total} [{'#' * filled}{'-' * (self.width - filled)}] "
                f"{fraction:4.0%} {fields} ETA {format_duration(eta)}").replace("  ", " ")

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        text = self.line(step, **values)
        if self.interactive:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """Prints a message line without breaking the bar."""
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
