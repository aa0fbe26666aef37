"""The ``studies_ner`` part of `benchmarks.accelerator`: the issue-18 NER grids on a GPU.

    python -m benchmarks.accelerator --out DIR --parts studies_ner     # not in the default run

One section per study of `python -m experiments.reproduce`, in order: ``globalpointer``
(GlobalPointer variants × 3 seeds to convergence), ``rdrop`` (α ∈ {1, 4} × dropout ∈
{0.1, 0.3} × 3 seeds, on the full data and on a small training subset) and
``optimizers`` (the learning-rate grids). Each study runs as `python -m
experiments.reproduce STUDY --preset P --seeds 0 1 2` for every preset `P` of the study
named ``gpu`` or ``gpu_<something>`` (e.g. one preset per regime): the grids are the
studies' own, defined there. A study that has no such preset yet is recorded as
skipped, naming the presets it has, rather than failed. All runs start at once as
separate processes sharing the device (`XLA_PYTHON_CLIENT_MEM_FRACTION` each); each
section waits for its study's processes, then gives the study's own table (its
markdown, as `experiments.reproduce` writes it) and its record
(`section.data["records"]`, scratch paths as `<scratch>`).

Data: CLUENER 2020 from `kexue.data.default_cluener_dir()`, i.e. the repository's
ignored `.data/cluener` (copy `train.jsonl` and `dev.jsonl` there before the GPU
session; the machine has no network) or `../shared/data/cluener`. The dataset and its
character vocabulary are built once before the study processes start.

With `--smoke` (CPU): the studies' ``smoke`` presets, seed 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import accelerator_studies as studies
from benchmarks.accelerator import REPOSITORY, PartReport, Section
from benchmarks.accelerator_studies import (
    Job,
    job_env,
    launch,
    log_tail,
    read_record,
    stop_all,
    wait,
)

STUDIES = ("globalpointer", "rdrop", "optimizers")
SEEDS = (0, 1, 2)
SMOKE_SEEDS = (0,)
#: Seconds kept back from the part's budget for reading the results and writing them.
RESERVE_S = 20.0
GPU_PRESET = re.compile(r"^gpu(_\w+)?$")


def study_presets(study: str) -> list[str]:
    """The presets `experiments.reproduce STUDY --list-presets` names.

    Raises:
      RuntimeError: the command failed or printed no JSON list.
    """
    result = subprocess.run([sys.executable, "-m", studies.REPRODUCE, study, "--list-presets"],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
                            check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"`{studies.REPRODUCE} {study} --list-presets` ended with status "
                           f"{result.returncode}: {result.stderr[-2000:]}")
    presets = json.loads(lines[-1])
    if not isinstance(presets, list):
        raise RuntimeError(f"`{studies.REPRODUCE} {study} --list-presets` printed "
                           f"{lines[-1]!r}")
    return presets


def chosen_presets(presets: list[str], smoke: bool) -> list[str]:
    """`smoke` with `--smoke`; else every preset named ``gpu`` or ``gpu_<name>``."""
    if smoke:
        return [p for p in presets if p == "smoke"]
    return [p for p in presets if GPU_PRESET.match(p)]


def prepare_cluener() -> str:
    """Builds the CLUENER dataset and its character vocabulary once; returns its
    directory.

    Raises:
      RuntimeError: no CLUENER copy is found (the GPU machine cannot download it).
    """
    from kexue.data import DataConfig, default_cluener_dir, make_dataset

    directory = default_cluener_dir()
    if directory is None:
        raise RuntimeError("no CLUENER copy found: put train.jsonl and dev.jsonl into the "
                           "repository's .data/cluener (ignored by git; it travels with the "
                           "repository)")
    next(make_dataset(DataConfig(name="cluener", task="ner", tokenizer="char",
                                 manual_dir=directory, seq_len=64, batch_size=1),
                      "eval", process_index=0, process_count=1))
    return directory


def study_markdown(out: str, study: str) -> str:
    """The study's table as `experiments.reproduce` wrote it, headings made bold and the
    plot (which does not come back from the GPU machine) left out."""
    with open(os.path.join(out, f"{study}.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        if line.startswith("!["):
            continue
        heading = re.match(r"^#+\s+(.*)$", line)
        kept.append(f"**{heading.group(1)}**" if heading else line)
    return "\n".join(kept).strip()


@dataclasses.dataclass
class Planned:
    """A study's presets to run (empty: skipped, with `reason`)."""

    presets: list[str]
    reason: str = ""


def finish(section: Section, study: str, planned: Planned, jobs: dict[str, Job],
           scratch: str, until: float) -> None:
    if not planned.presets:
        section.skip(planned.reason)
        return
    wait(list(jobs.values()), until)
    section.data["processes"] = {preset: job.summary() for preset, job in jobs.items()}
    section.data["records"] = {}
    for preset, job in jobs.items():
        if not section.check(f"{study} --preset {preset} finished", job.succeeded):
            why = ("stopped at the part's budget" if job.stopped
                   else f"ended with status {job.process.returncode}")
            section.note(f"`{study} --preset {preset}` {why} after {job.seconds:.0f} s; "
                         f"its last output:\n\n```\n{log_tail(job.log_path).rstrip()}\n```")
            continue
        section.note(f"Preset `{preset}` ({job.seconds:.0f} s):\n\n"
                     + study_markdown(job.out, study).replace(scratch, "<scratch>"))
        section.data["records"][preset] = read_record(job.out, study, scratch)


def run(report: PartReport) -> None:
    seeds = SMOKE_SEEDS if report.smoke else SEEDS
    scratch = tempfile.mkdtemp(prefix="kexue-accelerator-ner-")
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(scratch, "cache")
    plans: dict[str, Planned] = {}
    jobs: dict[str, dict[str, Job]] = {study: {} for study in STUDIES}
    try:
        with report.section("setup", "Data, presets and study processes") as section:
            began = time.perf_counter()
            directory = prepare_cluener()
            section.note(f"CLUENER from `{os.path.relpath(directory, REPOSITORY)}` prepared "
                         f"in {time.perf_counter() - began:.1f} s.")
            for study in STUDIES:
                try:
                    presets = study_presets(study)
                except Exception as error:
                    plans[study] = Planned([], f"its presets could not be listed: "
                                               f"{section.record_error(study, error)}")
                    continue
                chosen = chosen_presets(presets, report.smoke)
                reason = ("" if chosen else f"`{study}` has no `gpu` preset yet (its presets: "
                          f"{', '.join(presets)}); its GPU grid waits for one")
                plans[study] = Planned(chosen, reason)
            count = sum(len(plan.presets) for plan in plans.values())
            share = studies.GPU_MEMORY_SHARE / max(count, 1)
            for study in STUDIES:
                for preset in plans[study].presets:
                    jobs[study][preset] = launch(study, preset, seeds, scratch, steps=None,
                                                 env=job_env(share, cache),
                                                 tag=f"{study}-{preset}")
            section.table(["study", "presets run", "seeds", "skipped because"],
                          [[study, ", ".join(plans[study].presets) or "—",
                            " ".join(map(str, seeds)) if plans[study].presets else "—",
                            plans[study].reason or "—"] for study in STUDIES])
            section.note(f"{count} processes at once, each with "
                         f"XLA_PYTHON_CLIENT_MEM_FRACTION={share:.3f}.")
        until = report.deadline - RESERVE_S
        for study in STUDIES:
            with report.section(study, f"`{study}` at GPU scale") as section:
                plan = plans.get(study, Planned([], "the setup section did not finish"))
                finish(section, study, plan, jobs[study], scratch, until)
    finally:
        stop_all([job for by_preset in jobs.values() for job in by_preset.values()])
        shutil.rmtree(scratch, ignore_errors=True)

