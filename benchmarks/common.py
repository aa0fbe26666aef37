"""Reporting helpers shared by the benchmark scripts (timing and provenance come from
`kexue.train.measure`)."""

from __future__ import annotations

from collections.abc import Sequence

from kexue.train.measure import interleaved_median_times, machine_description, today

__all__ = ["interleaved_median_times", "machine_description", "markdown_table", "today"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
