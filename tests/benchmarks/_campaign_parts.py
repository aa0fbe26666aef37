"""Parts for the campaign tests of tests/benchmarks/test_accelerator.py.

`run(report)` behaves by the part's name: ``slow`` finishes one section and then
sleeps in the next (the campaign must kill it at its budget); ``mixed`` has a section
with a failed check, one with an item that raises, one that raises, and one that
succeeds; any other name finishes
one section.
"""

from __future__ import annotations

import time


def run(report) -> None:
    name = report.part.name
    with report.section("first", "First section") as section:
        section.table(["a", "b"], [[1, "x|y"]])
        section.data["value"] = 1.5
    if name == "slow":
        with report.section("sleeping", "Sleeping section"):
            print("sleeping past the budget", flush=True)
            time.sleep(600)
    if name == "mixed":
        with report.section("failing", "A check fails") as section:
            section.check("one is two", 1 == 2)
        with report.section("item", "One item raises") as section:
            try:
                raise ValueError("bad item")
            except ValueError as error:
                section.table(["item", "result"], [["x", section.record_error("x", error)]])
        with report.section("raising", "An exception") as section:
            raise RuntimeError("deliberate failure")
        with report.section("last", "Runs after the exception") as section:
            section.note("still here")
