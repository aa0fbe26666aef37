"""`benchmarks.accelerator`: every part at --smoke size on CPU, time-outs, statuses, report."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import pytest

from benchmarks import accelerator, accelerator_report
from kexue import ops
from tests.benchmarks import _fake_reproduce as fake

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
    """`--smoke` runs the default parts in one process (the studies, whose work is in
    subprocesses, in a thread beside the others), every section ``ok``."""
    out = tmp_path / "out"
    process = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--smoke",
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                             timeout=1800, check=False)
    assert process.returncode == 0, process.stdout[-6000:] + process.stderr[-3000:]
    assert process.stdout.count("(in this process, budget") == 2
    assert "== part studies (in a thread of this process, budget" in process.stdout
    files = sorted(os.listdir(out))
    assert files == sorted(f"{p.name}.{ext}" for p in accelerator.DEFAULT_PARTS
                           for ext in ("json", "md"))
    assert len(files) <= 8
    docs = {}
    for part in accelerator.DEFAULT_PARTS:
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
    assert [row[0] for row in rows_of(correctness, "models")] == [
        "causal LM", "RoFormer MLM (entropy-invariant)", "GlobalPointer NER",
        "multilabel classifier"]
    (checkpoint,) = rows_of(correctness, "checkpoint")
    assert checkpoint[2] == "cpu" and checkpoint[-1] is True
    studies = docs["studies"]
    assert [s["name"] for s in studies["sections"]] == ["setup", "mlm", "lm"]
    (mlm,) = [s for s in studies["sections"] if s["name"] == "mlm"]
    record = mlm["data"]["record"]
    assert (record["study"], record["preset"], record["seeds"]) == (
        "entropy_invariance", "smoke", [0])
    mean, per_seed = mlm["tables"]
    assert mean["header"] == ["variant", *map(str, record["lengths"])]
    assert [row[0] for row in mean["rows"]] == list(record["variants"])
    assert len(per_seed["rows"]) == 4 and {row[1] for row in per_seed["rows"]} == {"0"}
    (lm,) = [s for s in studies["sections"] if s["name"] == "lm"]
    assert lm["data"]["record"]["study"] == "lm_extrapolation"
    assert len(lm["tables"]) == 4  # whole windows and tail: mean, then per seed
    assert "<scratch>" in json.dumps(record) and "kexue-accelerator-studies" not in json.dumps(
        studies)
    speed = docs["speed"]
    assert [s["name"] for s in speed["sections"]] == [
        "peak", "lm_124m", "peers", "lm_350m", "length"]
    assert [row[1] for row in rows_of(speed, "lm_124m")] == ["adamw", "amos", "amos_style"]
    (length,) = [s for s in speed["sections"] if s["name"] == "length"]
    for policy in ("none", "full"):
        assert 16 <= length["data"]["policies"][policy]["length"] <= 32
    # The report renders smoke results only when told to.
    with pytest.raises(ValueError, match="full-size run"):
        accelerator_report.load_results(str(out))
    assert set(accelerator_report.load_results(str(out), allow_cpu=True)) == {
        p.name for p in accelerator.DEFAULT_PARTS}


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
    # The default campaign: under 8 minutes, with room for start-up; the studies take
    # the largest share.
    default = accelerator.DEFAULT_PARTS
    assert [p.name for p in default] == ["correctness", "studies", "speed"]
    assert (sum(p.budget_s for p in default) + accelerator.MARGIN_S
            <= accelerator.DEFAULT_DEADLINE_S < 480)
    assert max(default, key=lambda p: p.budget_s).name == "studies"
    assert accelerator.default_deadline(default, smoke=False) == accelerator.DEFAULT_DEADLINE_S
    # A part outside it runs alone within one GPU-machine command (10 minutes).
    (ner,) = [p for p in accelerator.PARTS if not p.in_default]
    assert ner.name == "studies_ner"
    assert (accelerator.default_deadline([ner], smoke=False) == ner.budget_s
            + accelerator.MARGIN_S <= accelerator.MAX_DEADLINE_S < 600)
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


# ----------------------------------------------------------------------------- studies


FAKE_REPRODUCE = "tests.benchmarks._fake_reproduce"


def registered(name: str) -> accelerator.Part:
    (part,) = [p for p in accelerator.PARTS if p.name == name]
    return part


def section_of(doc: dict, name: str) -> dict:
    (found,) = [s for s in doc["sections"] if s["name"] == name]
    return found


@pytest.fixture
def fake_studies(monkeypatch):
    """The studies parts with `experiments.reproduce` replaced by a stand-in that writes
    known records at once (tests/benchmarks/_fake_reproduce.py), no dataset built."""
    from benchmarks import accelerator_studies, accelerator_studies_ner

    monkeypatch.setattr(accelerator_studies, "REPRODUCE", FAKE_REPRODUCE)
    monkeypatch.setattr(accelerator_studies, "prepare_text_files", lambda: None)
    monkeypatch.setattr(accelerator_studies_ner, "prepare_cluener", lambda: ROOT)
    return accelerator_studies


def test_studies_part_runs_seeds_apart_and_merges_them(tmp_path, fake_studies):
    """The GPU layout: MLM seeds 0 and 1 in two processes, then merged by a third call
    that reads both back; the LM's two seeds in one process; every cell of the tables
    is the study's number."""
    status = accelerator.run_part_here(registered("studies"), str(tmp_path), smoke=False,
                                       deadline=time.time() + 120)
    doc = accelerator.read_part(str(tmp_path), "studies")
    assert status == 0, doc
    assert [(s["name"], s["status"]) for s in doc["sections"]] == [
        ("setup", "ok"), ("mlm", "ok"), ("lm", "ok")]
    mlm = section_of(doc, "mlm")
    assert [p["seeds"] for p in mlm["data"]["processes"]] == [[0], [1]]
    record = mlm["data"]["record"]
    assert (record["study"], record["preset"], record["seeds"]) == (
        "entropy_invariance", "gpu", [0, 1])
    assert all(v["reused_seeds"] == [0, 1] for v in record["variants"].values())
    mean, per_seed = mlm["tables"]
    assert mean["header"] == ["variant", "64", "128", "256"]
    lengths = fake.LENGTHS
    for index, (name, row) in enumerate(zip(fake.MLM_VARIANTS, mean["rows"], strict=True)):
        average, spread = zip(*(fake.summary([fake.value(index, s, n) for s in (0, 1)])
                                for n in lengths), strict=True)
        assert row == [name, *(f"{100 * m:.2f} ± {100 * d:.2f}"
                               for m, d in zip(average, spread, strict=True))]
    assert per_seed["rows"][3] == ["standard + random positions", "1",
                                   *(f"{100 * fake.value(1, 1, n):.2f}" for n in lengths)]
    notes = " ".join(mlm["notes"])
    assert "100 steps at length 64 = 0.0M training tokens per run; seeds 0, 1" in notes
    # The merge reads runs back: it gets no share of the device memory.
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=None" in notes
    lm = section_of(doc, "lm")
    assert [p["seeds"] for p in lm["data"]["processes"]] == [[0, 1]]
    whole, tail, _, tail_seeds = lm["tables"]
    assert "tail" in tail["title"] and "per seed" in tail_seeds["title"]
    average = fake.summary([fake.value(1, 0, 64), fake.value(1, 1, 64)])[0]
    assert whole["rows"][1][1].startswith(f"{average:.3f} ± ")
    assert tail_seeds["rows"][0] == ["standard", "0", *(f"{fake.value(0, 0, n, True):.3f}"
                                                        for n in lengths)]
    assert "<scratch>/out-" in lm["data"]["record"]["command"]
    # Three processes share the device: 0.9 of its memory, a third each.
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.300" in " ".join(lm["notes"])


def test_studies_part_reports_the_seeds_that_finished(tmp_path, fake_studies, monkeypatch):
    monkeypatch.setenv("FAKE_REPRODUCE_FAIL_SEED", "1")
    status = accelerator.run_part_here(registered("studies"), str(tmp_path), smoke=False,
                                       deadline=time.time() + 120)
    assert status == 1
    doc = accelerator.read_part(str(tmp_path), "studies")
    mlm, lm = section_of(doc, "mlm"), section_of(doc, "lm")
    assert mlm["status"] == "failed" and mlm["data"]["record"]["seeds"] == [0]
    assert mlm["failed_checks"] == ["entropy_invariance: every planned seed finished"]
    notes = " ".join(mlm["notes"])
    assert "seed(s) [1] ended with status 1" in notes and "fake failure" in notes
    assert "Only seeds [0] of [0, 1] finished" in notes
    assert {row[1] for row in mlm["tables"][1]["rows"]} == {"0"}
    assert lm["status"] == "failed" and "record" not in lm["data"]
    assert lm["failed_checks"] == ["lm_extrapolation: some seed finished"]


def test_study_processes_are_stopped_at_the_part_budget(tmp_path, fake_studies, monkeypatch):
    monkeypatch.setenv("FAKE_REPRODUCE_SLEEP", "60")
    started = time.time()
    status = accelerator.run_part_here(registered("studies"), str(tmp_path), smoke=False,
                                       deadline=started + fake_studies.MERGE_RESERVE_S + 3)
    assert status == 1 and time.time() - started < 30
    doc = accelerator.read_part(str(tmp_path), "studies")
    for name in ("mlm", "lm"):
        section = section_of(doc, name)
        assert section["status"] == "failed"
        assert all(p["stopped_at_budget"] for p in section["data"]["processes"])
        assert "stopped at the part's budget" in " ".join(section["notes"])


def test_ner_part_runs_gpu_presets_and_skips_studies_without_one(tmp_path, fake_studies):
    from benchmarks import accelerator_studies_ner as ner

    assert ner.chosen_presets(["default", "gpu", "gpu_subset", "gpus", "smoke"], False) == [
        "gpu", "gpu_subset"]
    assert ner.chosen_presets(["default", "gpu", "smoke"], True) == ["smoke"]
    status = accelerator.run_part_here(registered("studies_ner"), str(tmp_path), smoke=False,
                                       deadline=time.time() + 120)
    doc = accelerator.read_part(str(tmp_path), "studies_ner")
    assert status == 0, doc
    assert [(s["name"], s["status"]) for s in doc["sections"]] == [
        ("setup", "ok"), ("globalpointer", "ok"), ("rdrop", "ok"), ("optimizers", "skipped")]
    rdrop = section_of(doc, "rdrop")
    assert sorted(rdrop["data"]["records"]) == ["gpu", "gpu_subset"]
    # One process per seed, then one merging call that reads the three back.
    processes = rdrop["data"]["processes"]["gpu_subset"]
    assert [p["seeds"] for p in processes] == [[0], [1], [2], [0, 1, 2]]
    assert processes[-1]["merge"] and all(p["returncode"] == 0 for p in processes)
    merged = rdrop["data"]["records"]["gpu_subset"]
    assert merged["seeds"] == [0, 1, 2]
    assert all(v["reused_seeds"] == [0, 1, 2] for v in merged["variants"].values())
    notes = "\n".join(rdrop["notes"])
    assert "**Fake rdrop**" in notes and "| gpu_subset | 0 1 2 |" in notes
    assert "![" not in notes and "# Fake" not in notes
    skipped = " ".join(section_of(doc, "optimizers")["notes"])
    assert "`optimizers` has no `gpu` preset yet (its presets: default, smoke)" in skipped
    setup = section_of(doc, "setup")
    assert setup["tables"][0]["rows"][2] == ["optimizers", "—", "—", skipped[len("Skipped: "):]]
    # 3 presets x 3 seeds = 9 processes share 0.9 of the device memory.
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.100" in " ".join(setup["notes"])


def test_ner_part_merges_the_seeds_that_finished(tmp_path, fake_studies, monkeypatch):
    monkeypatch.setenv("FAKE_REPRODUCE_FAIL_SEED", "1")
    status = accelerator.run_part_here(registered("studies_ner"), str(tmp_path), smoke=False,
                                       deadline=time.time() + 120)
    assert status == 1
    doc = accelerator.read_part(str(tmp_path), "studies_ner")
    gp = section_of(doc, "globalpointer")
    assert gp["status"] == "failed"
    assert gp["failed_checks"] == ["globalpointer --preset gpu: every planned seed finished"]
    assert gp["data"]["records"]["gpu"]["seeds"] == [0, 2]
    notes = "\n".join(gp["notes"])
    assert "seed(s) [1]: ended with status 1" in notes and "fake failure" in notes
    assert "Only seeds [0, 2] of [0, 1, 2] finished within the budget." in notes
