"""The ``studies_ner`` part of `benchmarks.accelerator`: the issue-18 NER grids on a GPU.

    python -m benchmarks.accelerator --out DIR --parts studies_ner     # not in the default run

One section per study of `python -m experiments.reproduce`, in order: ``globalpointer``
(GlobalPointer variants × 3 seeds, 3000 steps, best evaluation), ``rdrop`` (α ∈ {0, 0.1,
0.3, 1, 4} × dropout ∈ {0.1, 0.3} × 3 seeds, on the full data (`gpu`) and on a small training
subset (`gpu_overfit`)) and ``optimizers`` (5 learning rates per optimizer, on the LM
(`gpu_lm`) and on NER with the collapse variants (`gpu_ner`)). Each study runs through
`python -m experiments.reproduce STUDY --preset P` for every preset `P` of the study
named ``gpu`` or ``gpu_<something>``: the grids are the studies' own, defined there. A
study that has no such preset is recorded as skipped, naming the presets it has,
rather than failed. Every (study, preset, seed) is one process, all started at once
and sharing the device (`XLA_PYTHON_CLIENT_MEM_FRACTION` each; the models are small
and leave an H200 mostly idle, so concurrency is where the speed comes from); the
processes share one runs folder and one persistent compilation cache. When they have
ended (or at the part's budget less `MERGE_RESERVE_S`, when those still running are
stopped), one more call per (study, preset) with the seeds that finished merges them:
it reads the finished runs back instead of training them. Each section then gives the
study's own table (its markdown, as `experiments.reproduce` writes it) and its record
(`section.data["records"]`, scratch paths as `<scratch>`), and names the seeds that did
not finish.

Data: CLUENER 2020 from `kexue.data.default_cluener_dir()`, i.e. the repository's
ignored `.data/cluener` (copy `train.jsonl` and `dev.jsonl` there before the GPU
session; the machine has no network) or `../shared/data/cluener`. The dataset and its
character vocabulary are built once before the study processes start.

With `--smoke` (CPU): the studies' ``smoke`` presets, seed 0, one process each (no
merge).
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
#: Seconds kept back (beyond RESERVE_S) for the merging calls, which run concurrently.
MERGE_RESERVE_S = 60.0
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


@dataclasses.dataclass
class PresetRun:
    """A (study, preset): its per-seed processes, and the merge of the finished seeds."""

    study: str
    preset: str
    jobs: list[Job]
    merge: Job | None = None

    @property
    def done(self) -> list[int]:
        return sorted(seed for job in self.jobs if job.succeeded for seed in job.seeds)

    @property
    def planned(self) -> list[int]:
        return sorted(seed for job in self.jobs for seed in job.seeds)

    @property
    def out(self) -> str | None:
        """Where the record of the finished seeds is (None: no seed finished, or the
        merge failed)."""
        if len(self.jobs) == 1:
            return self.jobs[0].out if self.jobs[0].succeeded else None
        return self.merge.out if self.merge is not None and self.merge.succeeded else None


def start_merges(runs: list[PresetRun], scratch: str, env: dict[str, str]) -> None:
    """Launches, at once, the merging call of every (study, preset) run as several
    processes of which some finished."""
    for run in runs:
        if len(run.jobs) > 1 and run.done:
            run.merge = launch(run.study, run.preset, run.done, scratch, steps=None, env=env,
                               tag=f"{run.study}-{run.preset}-merged")


def finish(section: Section, study: str, planned: Planned, runs: list[PresetRun],
           scratch: str) -> None:
    if not planned.presets:
        section.skip(planned.reason)
        return
    section.data["processes"] = {
        run.preset: [job.summary() for job in run.jobs]
        + ([{**run.merge.summary(), "merge": True}] if run.merge else []) for run in runs}
    section.data["records"] = {}
    for run in runs:
        for job in run.jobs:
            if not job.succeeded:
                why = ("stopped at the part's budget" if job.stopped
                       else f"ended with status {job.process.returncode}")
                section.note(f"`{study} --preset {run.preset}`, seed(s) {list(job.seeds)}: "
                             f"{why} after {job.seconds:.0f} s; its last output:\n\n```\n"
                             f"{log_tail(job.log_path).rstrip()}\n```")
        if run.merge is not None and not run.merge.succeeded:
            section.note(f"The merge of `{study} --preset {run.preset}` (seeds {run.done}) "
                         f"failed:\n\n```\n{log_tail(run.merge.log_path).rstrip()}\n```")
        out = run.out
        section.check(f"{study} --preset {run.preset}: every planned seed finished",
                      out is not None and run.done == run.planned)
        if out is None:
            continue
        times = ", ".join(f"seed(s) {list(job.seeds)} {job.seconds:.0f} s" for job in run.jobs)
        seeds = ("" if run.done == run.planned
                 else f" Only seeds {run.done} of {run.planned} finished within the budget.")
        section.note(f"Preset `{run.preset}` ({times}).{seeds}\n\n"
                     + study_markdown(out, study).replace(scratch, "<scratch>"))
        section.data["records"][run.preset] = read_record(out, study, scratch)


def run(report: PartReport) -> None:
    seeds = SMOKE_SEEDS if report.smoke else SEEDS
    scratch = tempfile.mkdtemp(prefix="kexue-accelerator-ner-")
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(scratch, "cache")
    plans: dict[str, Planned] = {}
    runs: dict[str, list[PresetRun]] = {study: [] for study in STUDIES}
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
            count = sum(len(plan.presets) for plan in plans.values()) * len(seeds)
            share = studies.GPU_MEMORY_SHARE / max(count, 1)
            for study in STUDIES:
                for preset in plans[study].presets:
                    runs[study].append(PresetRun(study, preset, [
                        launch(study, preset, [seed], scratch, steps=None,
                               env=job_env(share, cache), tag=f"{study}-{preset}-{seed}")
                        for seed in seeds]))
            section.table(["study", "presets run", "seeds (one process each)",
                           "skipped because"],
                          [[study, ", ".join(plans[study].presets) or "—",
                            " ".join(map(str, seeds)) if plans[study].presets else "—",
                            plans[study].reason or "—"] for study in STUDIES])
            section.note(f"{count} processes at once, each with "
                         f"XLA_PYTHON_CLIENT_MEM_FRACTION={share:.3f}.")
        every = [run for study_runs in runs.values() for run in study_runs]
        wait([job for run in every for job in run.jobs],
             report.deadline - RESERVE_S - MERGE_RESERVE_S)
        start_merges(every, scratch, {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                                      "JAX_COMPILATION_CACHE_DIR": cache})
        wait([run.merge for run in every if run.merge is not None],
             report.deadline - RESERVE_S)
        for study in STUDIES:
            with report.section(study, f"`{study}` at GPU scale") as section:
                plan = plans.get(study, Planned([], "the setup section did not finish"))
                finish(section, study, plan, runs[study], scratch)
    finally:
        stop_all([job for study_runs in runs.values() for run in study_runs
                  for job in (*run.jobs, *([run.merge] if run.merge else []))])
        shutil.rmtree(scratch, ignore_errors=True)
