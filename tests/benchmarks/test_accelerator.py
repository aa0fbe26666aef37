"""`benchmarks.accelerator`: every part at --smoke size on CPU, time-outs, statuses, report."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from benchmarks import accelerator, accelerator_report
from kexue import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = "tests.benchmarks._campaign_parts"


def fake_part(name: str, budget_s: float = 60) -> accelerator.Part:
    return accelerator.Part(name, name.title(), FAKE, budget_s=budget_s,
                            smoke_budget_s=budget_s, results_file="benchmarks/RESULTS.md")


def rows_of(doc: dict, section: str) -> list[list]:
    (found,) = [s for s in doc["sections"] if s["name"] == section]
    return [row for table in found["tables"] for row in table["rows"]]


@pytest.mark.slow
def test_smoke_campaign_runs_every_part_and_writes_its_files(tmp_path):
    out = tmp_path / "out"
    process = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--smoke",
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                             timeout=1800, check=False)
    assert process.returncode == 0, process.stdout[-6000:] + process.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == sorted(f"{p.name}.{ext}" for p in accelerator.PARTS for ext in ("json", "md"))
    assert len(files) <= 8
    docs = {}
    for part in accelerator.PARTS:
        doc = json.loads((out / f"{part.name}.json").read_text())
        docs[part.name] = doc
        assert doc["status"] == "ok", doc
        env = doc["env"]
        assert (env["backend"], env["smoke"], env["device_kind"]) == ("cpu", True, "cpu")
        assert env["versions"]["jax"] == jax.__version__
        assert datetime.datetime.fromisoformat(env["date"]).year >= 2025
        assert [s["status"] for s in doc["sections"]] == ["ok"] * len(doc["sections"])
        markdown = (out / f"{part.name}.md").read_text()
        assert markdown == accelerator.render_part(doc)
        assert "smoke run" in markdown
    correctness = docs["correctness"]
    assert [s["name"] for s in correctness["sections"]] == [
        "environment", "ops", "attention", "models", "checkpoint"]
    # Every public op is checked on the device (a new op must get a check).
    checked = " ".join(str(row[0]) for row in rows_of(correctness, "ops"))
    assert [name for name in ops.__all__ if name not in checked] == []
    attention = rows_of(correctness, "attention")
    implementations = {row[0] for row in attention}
    assert "xla" in implementations and "cudnn" not in implementations  # cuDNN: GPU only
    assert {row[2] for row in attention} == {"float32", "bfloat16"}
    assert len(rows_of(correctness, "models")) == 4
    (checkpoint,) = rows_of(correctness, "checkpoint")
    assert checkpoint[2] == "cpu" and checkpoint[-1] is True
    speed = docs["speed"]
    assert [s["name"] for s in speed["sections"]] == [
        "peak", "lm_124m", "peers", "lm_350m", "length"]
    assert [row[1] for row in rows_of(speed, "lm_124m")] == ["adamw", "amos", "amos_style"]
    (length,) = [s for s in speed["sections"] if s["name"] == "length"]
    for policy in ("none", "full"):
        assert 16 <= length["data"]["policies"][policy]["length"] <= 64
    # The report renders smoke results only when told to.
    with pytest.raises(ValueError, match="full-size run"):
        accelerator_report.load_results(str(out))
    assert set(accelerator_report.load_results(str(out), allow_cpu=True)) == {
        p.name for p in accelerator.PARTS}


def test_a_part_past_its_budget_is_killed_and_the_next_one_runs(tmp_path, capsys):
    status = accelerator.run_campaign([fake_part("slow", budget_s=20), fake_part("quick")],
                                      str(tmp_path), smoke=True, deadline_s=300)
    assert status == 1
    slow = accelerator.read_part(str(tmp_path), "slow")
    assert slow["status"] == "timeout" and "time budget of 20 s" in slow["error"]
    # The finished section was kept; the one in flight is lost.
    assert [s["name"] for s in slow["sections"]] == ["first"]
    assert "sleeping past the budget" in slow["log_tail"]
    quick = accelerator.read_part(str(tmp_path), "quick")
    assert quick["status"] == "ok" and quick["log_tail"] is None
    assert sorted(os.listdir(tmp_path)) == ["quick.json", "quick.md", "slow.json", "slow.md"]
    assert "campaign: slow timeout, quick ok" in capsys.readouterr().out


def test_parts_that_cannot_start_before_the_deadline_are_recorded(tmp_path):
    status = accelerator.run_campaign([fake_part("quick")], str(tmp_path), smoke=True,
                                      deadline_s=1)
    assert status == 1
    doc = accelerator.read_part(str(tmp_path), "quick")
    assert doc["status"] == "timeout" and doc["error"].startswith("not started")
    assert doc["sections"] == []


def test_failed_checks_and_exceptions_are_recorded_and_the_part_goes_on(tmp_path):
    status = accelerator.run_part_here(fake_part("mixed"), str(tmp_path), smoke=True,
                                       deadline=1e12)
    assert status == 1
    doc = accelerator.read_part(str(tmp_path), "mixed")
    assert doc["status"] == "error"
    assert [(s["name"], s["status"]) for s in doc["sections"]] == [
        ("first", "ok"), ("failing", "failed"), ("item", "error"), ("raising", "error"),
        ("last", "ok")]
    (failing,) = [s for s in doc["sections"] if s["name"] == "failing"]
    assert failing["failed_checks"] == ["one is two"]
    (item,) = [s for s in doc["sections"] if s["name"] == "item"]
    assert item["tables"][0]["rows"] == [["x", "ValueError: bad item"]]
    assert item["item_errors"][0]["what"] == "x"
    assert "ValueError: bad item" in item["item_errors"][0]["traceback"]
    (raising,) = [s for s in doc["sections"] if s["name"] == "raising"]
    assert "RuntimeError: deliberate failure" in raising["error"]
    markdown = (tmp_path / "mixed.md").read_text()
    assert "| 1 | x\\|y |" in markdown  # cells are escaped for the table
    assert "### A check fails (failed" in markdown


def test_other_attention_implementations_are_compared_with_xla(monkeypatch, rng):
    """The GPU-only comparison path, run on CPU: a stand-in "cudnn" that is XLA itself
    must agree with XLA exactly, and an implementation this backend lacks is skipped."""
    from benchmarks import accelerator_correctness as correctness

    monkeypatch.setattr(correctness, "implementations",
                        lambda: [("cudnn", ("bfloat16",)), ("elsewhere", None)])
    xla = correctness._attention_fn
    monkeypatch.setattr(correctness, "_attention_fn",
                        lambda implementation, scale: xla("xla", scale))
    section = accelerator.Section("attention", "Attention")
    correctness.attention_section(section, rng, correctness.SMOKE)
    assert section.status == "ok", section.as_dict()
    reference, against_xla = section.tables
    assert {row[0] for row in reference["rows"]} == {"xla", "cudnn"}
    assert len(against_xla["rows"]) == len(correctness.ATTENTION_CASES)
    for row in against_xla["rows"]:
        assert (row[0], row[2]) == ("cudnn", "bfloat16")
        assert float(row[3]) == 0 and float(row[4]) == 0 and row[5] is True
    assert "`elsewhere` skipped" in " ".join(section.notes)


def test_a_json_too_large_to_come_back_drops_raw_data_only(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "MAX_FILE_BYTES", 2000)
    section = accelerator.Section("big", "Big")
    section.table(["x"], [[1]])
    section.data["values"] = list(range(1000))
    doc = {"schema": 1, "part": "big", "title": "Big", "status": "ok", "env": {},
           "sections": [section.as_dict()], "error": None, "log_tail": None}
    accelerator.write_part_files(str(tmp_path), doc)
    written = accelerator.read_part(str(tmp_path), "big")
    assert (tmp_path / "big.json").stat().st_size <= 2000
    assert written["sections"][0]["tables"] == section.tables
    assert written["sections"][0]["data"]["note"].startswith("dropped")


def test_parts_argument_is_checked():
    with pytest.raises(ValueError, match="`--parts`: expected names among"):
        accelerator.main(["--out", "unused", "--parts", "correctness,nonsense"])


def test_registry_fits_the_files_the_gpu_machine_returns():
    assert len(accelerator.PARTS) <= accelerator.MAX_PARTS == 4
    assert len({p.name for p in accelerator.PARTS}) == len(accelerator.PARTS)
    assert sum(p.budget_s for p in accelerator.PARTS) <= accelerator.DEFAULT_DEADLINE_S
    for part in accelerator.PARTS:
        assert part.results_file in accelerator_report.FILES


# ----------------------------------------------------------------------------- report


def test_replace_block_rewrites_between_markers_only():
    text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n"
    new = accelerator_report.replace_block(text, "x", "new table")
    assert new == "a\n<!-- x:begin -->\nnew table\n<!-- x:end -->\nb\n"
    assert accelerator_report.replace_block(new, "x", "new table") == new
    with pytest.raises(ValueError, match="markers `<!-- y:begin -->`"):
        accelerator_report.replace_block(text, "y", "anything")


def test_committed_documents_match_the_committed_results(tmp_path):
    """RESULTS.md and docs/results.md hold exactly what the report script generates
    from benchmarks/accelerator_results/ (no GPU figures there: every part waits)."""
    docs = accelerator_report.load_results(os.path.join(ROOT, accelerator_report.DEFAULT_RESULTS))
    for path in accelerator_report.FILES:
        copy = tmp_path / path
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, path), copy)
        assert not accelerator_report.update_file(path, docs, root=str(tmp_path)), path
    if not docs:
        status = accelerator_report.status_block({})
        assert status.count("none yet: waits for a GPU") == len(accelerator.PARTS)


def test_report_renders_accelerator_results(tmp_path):
    """A GPU document (its environment says so) fills its part's block and the status."""
    doc = {"schema": 1, "part": "speed", "title": "Speed", "status": "ok",
           "env": {"backend": "gpu", "smoke": False, "device_kind": "NVIDIA H200",
                   "device_count": 1, "date": "2026-12-01T10:00:00+00:00",
                   "versions": {"jax": "0.11.2"}},
           "sections": [{"name": "peak", "title": "Measured matmul peak", "status": "ok",
                         "elapsed_s": 1.0, "notes": ["n"], "failed_checks": [], "data": {},
                         "error": None, "tables": [{"title": "", "header": ["size"],
                                                    "rows": [["8192 x 8192"]]}]}],
           "error": None, "log_tail": None}
    accelerator.write_part_files(str(tmp_path), doc)
    docs = accelerator_report.load_results(str(tmp_path))
    blocks = accelerator_report.blocks_for("benchmarks/RESULTS.md", docs)
    assert "| 8192 x 8192 |" in blocks["accelerator-speed"]
    assert "NVIDIA H200" in blocks["accelerator-speed"]
    assert "waits for a GPU" in blocks["accelerator-correctness"]
    assert "| speed | Speed | 1 of 1 sections | ok | NVIDIA H200 (gpu) | 2026-12-01 |" in (
        blocks["accelerator-status"])
