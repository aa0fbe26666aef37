"""Metric writers, progress bar, token counting and the non-finite stop of the loop."""

from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
import pytest

from kexue.parallel import make_mesh
from kexue.train import (
    JsonlWriter,
    NonFiniteError,
    ProgressBar,
    count_tokens,
    format_duration,
    format_number,
)
from tests.train import toy


def test_jsonl_writer_drops_records_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    for step in range(1, 6):
        writer.write(step, {"loss": np.float32(1.0 / step), "count": np.int32(step)})
    writer.write(6, {"loss": float("nan")})
    writer.close()
    with open(path, "a", encoding="utf-8") as file:
        file.write('{"step": 7, "lo')  # a line cut by kill -9
    JsonlWriter(path, resume_step=3).close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == pytest.approx(0.5) and records[2]["count"] == 3
    assert records[0]["split"] == "train"


def test_progress_bar_in_a_log_prints_full_lines():
    stream = io.StringIO()
    bar = ProgressBar(100, initial=20, stream=stream, width=10)
    bar.update(60, **{"loss": 0.25, "tokens/s": 123456.0})
    bar.write("message")
    bar.close()
    first, second = stream.getvalue().splitlines()
    assert first.startswith("step 60/100 [######----] 60% loss 0.25 tokens/s 123,456 ETA")
    assert "\r" not in stream.getvalue() and second == "message"


def test_numbers_are_printed_one_way():
    values = [21239.4, 5.34504, 0.00026132, 9.8e-05, 118597.0, 12, float("nan")]
    assert [format_number(v) for v in values] == [
        "21,239", "5.345", "0.0002613", "9.8e-05", "118,597", "12", "nan"]


def test_format_duration_and_count_tokens():
    assert [format_duration(s) for s in (5.2, 65, 3723, float("inf"))] == [
        "5s", "1m05s", "1h02m03s", "?"]
    assert count_tokens({"mask": np.ones((4, 8), bool), "tokens": np.zeros((4, 8), np.int32)}) == 32
    assert count_tokens({"x": np.zeros((4, 3), np.float32)}) == 4


def test_loop_stops_after_consecutive_nonfinite_steps_keeping_checkpoint(tmp_path):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(NonFiniteError, match=r"step 5: .* 2 consecutive steps"):
        toy.run(str(tmp_path), mesh, 10, poison=(3, 4), max_consecutive_nonfinite=2,
                checkpoint_every=2)
    saved = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert saved[-1] <= 4 and 2 in saved
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["nonfinite"] for r in records] == [0, 0, 0, 1, 1]
    assert records[4]["loss"] == "nan" and records[4]["nonfinite_steps"] == 2
