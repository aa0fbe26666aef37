"""The ``studies`` part of `benchmarks.accelerator`: entropy-invariant attention at GPU scale.

Sections, most valuable first (each is saved as it ends):

1. **MLM** — `python -m experiments.reproduce entropy_invariance --preset gpu`: the
   RoFormer MLM of `configs/mlm_extrapolation.py` at the config's own size (width 256,
   4 layers) and recipe (batch 64 × 64 bytes, 5000 steps = 20.5M training tokens per
   run, Amos-style with half-life 2000), bf16 compute, for the four variants attention
   scale ∈ {standard, entropy-invariant} × training positions ∈ {contiguous,
   equal-mean random}, seeds 0 and 1; masked-token accuracy at 64 … 4096.
2. **Causal LM** — `python -m experiments.reproduce lm_extrapolation --preset gpu`: the
   `configs/lm_stdlib.py` model (width 256, 4 layers, Amos) trained at length 64 for
   5000 steps of 64 windows (20.5M tokens), bf16, standard vs entropy-invariant scale,
   seeds 0 and 1; held-out bits per byte at 64 … 4096, whole windows and tail.

Each section gives the mean over seeds (± sample standard deviation) per variant and
length, every seed's values, and the study's record (`section.data["record"]`, the
JSON `experiments.reproduce` wrote, with the scratch paths replaced by `<scratch>`).

How it runs. The studies go through `python -m experiments.reproduce` in
subprocesses: the one implementation of each study (its variants, the config
overrides, `experiments.run` and `kexue.train.train_loop`, the task's evaluation), so
the GPU rows differ from the CPU tables of docs/results.md only by the preset. A model
this small leaves an H200 idle most of each step (kernel launches and the host's
input pipeline bound it), so the runs share the GPU as concurrent processes
(`FULL`): MLM seed 0, MLM seed 1, and the causal LM's two seeds, each process with
`XLA_PYTHON_CLIENT_MEM_FRACTION` = 0.3 (≈ 43 GB; more processes would not leave room
for the evaluation at 4096, below). The processes share the campaign's persistent
compilation cache, so programs that repeat (the evaluation steps of the two position
variants of one scale, of the LM's two seeds) compile once. Each process writes its
record; a study split over several processes is then merged by one more
`experiments.reproduce` call with all finished seeds, which reads the finished runs
back instead of training them. The dataset (the interpreter's
standard library, byte-level) is built once before the processes start, so they do not
race to build it. Processes still running at the part's budget (less `MERGE_RESERVE_S`)
are stopped; a study then reports the seeds that finished, and says which did not.

Expected time on one H200 (an estimate: no GPU has run it yet). Per step ≈ 3 ms: the
host cuts 64 windows of 64 bytes and masks them (3.4 ms per batch measured on the
loaded 2-core development machine, about half that on an idle core) and dispatches the
step, while the GPU runs a few hundred small kernels of a 3.3M-parameter model (≈ 1.5
ms). So 5000 steps ≈ 15 s per run; ≈ 5 s to compile a train step and ≈ 1.5 s per
evaluation program (7 lengths; shared through the cache by the two position variants of
a scale), ≈ 15 s to start a process, ≈ 5 s per run for data, evaluation and the
checkpoint. The longest process (four MLM runs) ≈ 15 + 4 × 20 + 41 ≈ 140 s, stretched to
≈ 170 s while three processes compete for the GPU, then ≈ 15 s for the merge: ≈ 3 min
of the part's 240 s budget, the processes being stopped 30 s before it
(`MERGE_RESERVE_S`). The largest memory need is the evaluation at 4096: a batch of 64 ×
4096 with XLA attention holds ≈ 31 GB (the f32 logits of one layer, 17 GB; its bf16
probabilities; the mask), within each process's 43 GB.

With `--smoke` (CPU): the studies' `smoke` presets (tiny models, 2 steps, lengths 64 …
1024), seed 0, one process per study (the merge of seeds run apart is tested with a
stand-in for `experiments.reproduce` in tests/benchmarks/test_accelerator.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.accelerator import LOG_TAIL_CHARS, REPOSITORY, PartReport, Section

#: The module the studies run through (a subprocess; benchmarks never import it).
REPRODUCE = "experiments.reproduce"
#: Seconds kept back from the part's budget for the merge and writing the results.
MERGE_RESERVE_S = 30.0
#: Share of the GPU memory the concurrent study processes take together.
GPU_MEMORY_SHARE = 0.9
#: Seconds between two looks at the running processes.
POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class Metric:
    """One value of a study record's variants: `variant[per_seed][seed][length]`, its
    mean and standard deviation over seeds `variant[mean][length]`,
    `variant[std][length]`, shown times `scale` with `digits` decimals."""

    label: str
    per_seed: str
    mean: str
    std: str
    scale: float
    digits: int

    def cell(self, value: float | None) -> str:
        return "—" if value is None else f"{self.scale * value:.{self.digits}f}"


@dataclasses.dataclass(frozen=True)
class Study:
    """A study of `experiments.reproduce` and the section that reports it.

    Attributes:
      name: the study's name on the `experiments.reproduce` command line.
      section: the section's name.
      title: the section's title.
      metrics: the record's values the tables show.
      better: which way is better, for the reading ("higher" or "lower").
    """

    name: str
    section: str
    title: str
    metrics: tuple[Metric, ...]
    better: str


STUDIES = (
    Study("entropy_invariance", "mlm",
          "MLM accuracy vs evaluation length (entropy_invariance)",
          (Metric("masked-token accuracy (%)", "accuracy", "mean", "std", 100.0, 2),),
          "higher"),
    Study("lm_extrapolation", "lm",
          "Causal-LM bits per byte vs evaluation length (lm_extrapolation)",
          (Metric("bits per byte, whole windows", "bits_per_byte", "mean", "std", 1.0, 3),
           Metric("bits per byte, tail (last quarter of each window)", "bits_per_byte_tail",
                  "tail_mean", "tail_std", 1.0, 3)),
          "lower"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What runs: the studies' preset, steps (None: the preset's) and the seeds of each
    process (`jobs[study name]`, one tuple of seeds per process; all start at once)."""

    preset: str
    steps: int | None
    jobs: dict[str, tuple[tuple[int, ...], ...]]


FULL = Layout("gpu", None, {"entropy_invariance": ((0,), (1,)), "lm_extrapolation": ((0, 1),)})
SMOKE = Layout("smoke", None, {"entropy_invariance": ((0,),), "lm_extrapolation": ((0,),)})


# ----------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Job:
    """One `experiments.reproduce` process: a study on some seeds. A watcher thread
    notes when the process ends, whoever waits for it."""

    study: str
    seeds: tuple[int, ...]
    out: str
    log_path: str
    process: subprocess.Popen
    started: float
    ended: float | None = None
    stopped: bool = False  # killed at the budget

    def __post_init__(self) -> None:
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.process.wait()
        self.ended = time.time()

    @property
    def finished(self) -> bool:
        return self.process.poll() is not None

    @property
    def succeeded(self) -> bool:
        return self.finished and not self.stopped and self.process.returncode == 0

    @property
    def seconds(self) -> float:
        """Wall seconds from the start to the end (or to now, while it runs)."""
        return (self.ended or time.time()) - self.started

    def summary(self) -> dict[str, Any]:
        return {"study": self.study, "seeds": list(self.seeds),
                "returncode": self.process.poll(), "stopped_at_budget": self.stopped,
                "seconds": round(self.seconds, 1)}


def reproduce_command(study: str, preset: str, seeds: Sequence[int], out: str, runs: str,
                      steps: int | None) -> list[str]:
    command = [sys.executable, "-m", REPRODUCE, study, "--preset", preset,
               "--seeds", *map(str, seeds), "--out", out, "--runs", runs]
    return command + ([] if steps is None else ["--steps", str(steps)])


def launch(study: str, preset: str, seeds: Sequence[int], scratch: str, *,
           steps: int | None, env: dict[str, str], tag: str) -> Job:
    """Starts `experiments.reproduce` for `study` on `seeds`; output to a log file."""
    out = os.path.join(scratch, f"out-{tag}")
    log_path = os.path.join(scratch, f"log-{tag}.txt")
    command = reproduce_command(study, preset, seeds, out, os.path.join(scratch, "runs"),
                                steps)
    print(f"[studies] {tag}: {' '.join(command[1:])}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPOSITORY, env=env)
    return Job(study, tuple(seeds), out, log_path, process, time.time())


def wait(jobs: Sequence[Job], until: float) -> None:
    """Waits for `jobs` until the time `until`; kills those still running then."""
    while not all(job.finished for job in jobs) and time.time() < until:
        time.sleep(POLL_S)
    for job in jobs:
        if not job.finished:
            job.stopped = True
            job.process.kill()
            job.process.wait()


def stop_all(jobs: Sequence[Job]) -> None:
    """Kills every job still running (the part ends, whatever happened)."""
    for job in jobs:
        if job.process.poll() is None:
            job.process.kill()
            job.process.wait()
            job.stopped = True


def log_tail(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-LOG_TAIL_CHARS:]


def read_record(out: str, study: str, scratch: str) -> dict[str, Any]:
    """The record `experiments.reproduce` wrote to `out`, scratch paths as `<scratch>`."""
    with open(os.path.join(out, f"{study}.json"), encoding="utf-8") as f:
        text = f.read()
    return json.loads(text.replace(scratch, "<scratch>"))


def job_env(share: float, cache: str) -> dict[str, str]:
    """The environment of one study process: its share of the GPU memory, preallocated,
    and the shared persistent compilation cache."""
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{share:.3f}",
            "JAX_COMPILATION_CACHE_DIR": cache}


def prepare_text_files() -> None:
    """Builds the byte-level text-files dataset (the studies' corpus) once, here, so
    the concurrent study processes find it instead of each building it at once."""
    from kexue.data import DataConfig, make_dataset

    next(make_dataset(DataConfig(name="text_files", task="lm", seq_len=64, batch_size=1),
                      "eval", process_index=0, process_count=1))


# ----------------------------------------------------------------------------- tables


def seed_keys(record: dict[str, Any]) -> list[str]:
    return [str(seed) for seed in record["seeds"]]


def study_tables(section: Section, study: Study, record: dict[str, Any]) -> None:
    """Mean ± std over seeds per variant and length, then every seed's values."""
    lengths = [str(n) for n in record["lengths"]]
    variants = record["variants"]
    for metric in study.metrics:
        rows = []
        for name, variant in variants.items():
            cells = []
            for n in lengths:
                spread = variant[metric.std][n]
                cells.append(metric.cell(variant[metric.mean][n])
                             + ("" if spread is None else f" ± {metric.cell(spread)}"))
            rows.append([name, *cells])
        section.table(["variant", *lengths], rows,
                      title=f"{metric.label}: mean over seeds {', '.join(seed_keys(record))} "
                            "(± sample standard deviation)")
    for metric in study.metrics:
        rows = [[name, seed, *(metric.cell(variant[metric.per_seed][seed][n])
                               for n in lengths)]
                for name, variant in variants.items() for seed in seed_keys(record)]
        section.table(["variant", "seed", *lengths], rows, title=f"{metric.label}, per seed")


def provenance_note(record: dict[str, Any]) -> str:
    overrides = record.get("model_and_data", {})
    batch = overrides.get("data.batch_size")
    tokens = ("" if batch is None else
              f" = {record['steps'] * batch * record['train_length'] / 1e6:.1f}M training "
              "tokens per run")
    settings = ", ".join(f"`{key}={value}`" for key, value in overrides.items())
    return (f"`{record['config']}` (study preset `{record['preset']}`: {settings}), "
            f"{record['steps']} steps at length {record['train_length']}{tokens}; seeds "
            f"{', '.join(seed_keys(record))}; {record['metric']}. Machine: "
            f"{record.get('machine', '?')}; study runtime {record.get('runtime_s', '?')} s; "
            f"command: `{record.get('command', '?')}`.")


# ----------------------------------------------------------------------------- the part


def finish_study(section: Section, study: Study, layout: Layout, jobs: list[Job],
                 scratch: str, env: dict[str, str], until: float) -> None:
    """Waits for `study`'s processes, merges the seeds that finished, writes the tables."""
    wait(jobs, until)
    section.data["processes"] = [job.summary() for job in jobs]
    planned = sorted(seed for job in jobs for seed in job.seeds)
    done = sorted(seed for job in jobs if job.succeeded for seed in job.seeds)
    for job in jobs:
        if not job.succeeded:
            why = ("stopped at the part's budget" if job.stopped
                   else f"ended with status {job.process.returncode}")
            section.note(f"The process of seed(s) {list(job.seeds)} {why} after "
                         f"{job.seconds:.0f} s; its last output:\n\n```\n"
                         f"{log_tail(job.log_path).rstrip()}\n```")
    times = ", ".join(f"seeds {list(job.seeds)}: {job.seconds:.0f} s" for job in jobs)
    section.note(f"Wall time of the study's processes: {times}.")
    if not done:
        section.check(f"{study.name}: some seed finished", False)
        return
    if len(jobs) == 1:
        out = jobs[0].out
    else:
        merge = launch(study.name, layout.preset, done, scratch, steps=layout.steps, env=env,
                       tag=f"{study.name}-merged")
        out = merge.out
        wait([merge], until + MERGE_RESERVE_S - 5.0)
        if not merge.succeeded:
            section.note(f"The merge of seeds {done} failed:\n\n```\n"
                         f"{log_tail(merge.log_path).rstrip()}\n```")
            section.check(f"{study.name}: merge of the finished seeds", False)
            return
    record = read_record(out, study.name, scratch)
    section.check(f"{study.name}: every planned seed finished", done == planned)
    if done != planned:
        section.note(f"Only seeds {done} of {planned} finished within the budget.")
    section.note(provenance_note(record))
    study_tables(section, study, record)
    section.data["record"] = record


def run(report: PartReport) -> None:
    layout = SMOKE if report.smoke else FULL
    scratch = tempfile.mkdtemp(prefix="kexue-accelerator-studies-")
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(scratch, "cache")
    count = sum(len(processes) for processes in layout.jobs.values())
    share = GPU_MEMORY_SHARE / count
    jobs: dict[str, list[Job]] = {study.name: [] for study in STUDIES}
    try:
        with report.section("setup", "Dataset and study processes") as section:
            began = time.perf_counter()
            prepare_text_files()
            section.note(f"Byte-level standard-library corpus prepared in "
                         f"{time.perf_counter() - began:.1f} s.")
            for study in STUDIES:
                for seeds in layout.jobs[study.name]:
                    jobs[study.name].append(launch(
                        study.name, layout.preset, seeds, scratch, steps=layout.steps,
                        env=job_env(share, cache),
                        tag=f"{study.name}-{'-'.join(map(str, seeds))}"))
            section.table(["study", "preset", "seeds of each process"],
                          [[study.name, layout.preset,
                            " | ".join(str(list(s)) for s in layout.jobs[study.name])]
                           for study in STUDIES])
            section.note(f"{count} processes at once, sharing the device, each with "
                         f"XLA_PYTHON_CLIENT_MEM_FRACTION={share:.3f}; one persistent "
                         "compilation cache.")
        until = report.deadline - MERGE_RESERVE_S
        merge_env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                     "JAX_COMPILATION_CACHE_DIR": cache}
        for study in STUDIES:
            with report.section(study.section, study.title) as section:
                if not jobs[study.name]:
                    section.skip("its processes did not start (see the setup section)")
                    continue
                finish_study(section, study, layout, jobs[study.name], scratch, merge_env,
                             until)
    finally:
        stop_all([job for study_jobs in jobs.values() for job in study_jobs])
        shutil.rmtree(scratch, ignore_errors=True)
