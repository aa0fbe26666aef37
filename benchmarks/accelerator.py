"""The accelerator campaign: kexue's correctness, studies and speed on a GPU, one command.

It proves kexue on the device, runs the entropy-invariance studies at the scale they
need, and measures speed.

    python -m benchmarks.accelerator --out DIR                  # default parts, < 8 min on one H200
    python -m benchmarks.accelerator --out DIR --parts speed    # some parts
    python -m benchmarks.accelerator --out DIR --parts studies_ner   # a part run only when named
    python -m benchmarks.accelerator --out DIR --smoke          # toy sizes on CPU, one process

On the GPU machine (no package index there; `benchmarks/accelerator_wheels.sh` fetched
the wheels its image lacks into `.whl/` beforehand), from the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
      && python3 -m benchmarks.accelerator --out "$OUT"

Parts run in the order of `PARTS` (most valuable first), each in its own process with
its own time budget, under an overall deadline (`--deadline-s`; `DEFAULT_DEADLINE_S`
for the default parts). Each part writes `DIR/<part>.json` and `DIR/<part>.md` after
every section it finishes, so a part killed at its budget keeps the sections done
before; the killed part is marked ``timeout`` and the next part starts. At most
`MAX_PARTS` parts (two files each: the GPU machine hands back at most 8 files) and
nothing deeper than `DIR` itself. Every file records the device kind, backend,
versions and date. The exit status is 0 only when every part finished with every
check passed (a ``skipped`` section does not count against it). All parts share one
persistent compilation cache (a temporary directory), so a program compiled twice is
read back the second time.

With `--smoke` the parts run in this process (`run_in_process`: no per-part interpreter
and imports, no kill at the budget; the studies, whose work is in subprocesses, in a
thread beside the others) with XLA:CPU's LLVM optimisation off (`SMOKE_XLA_FLAG`):
compiling is nearly all of a smoke run's time.

Parts (`PARTS`; the first three are the default campaign, `DEFAULT_PARTS`):

* ``correctness`` (`benchmarks.accelerator_correctness`): package versions and
  imports; the `kexue.ops` functions against float64 NumPy references
  (`benchmarks.references`) in float32 and bfloat16; every attention implementation
  other than XLA (cuDNN on GPU; any further one `kexue.models.config.
  ATTENTION_IMPLEMENTATIONS` accepts, e.g. blocked attention, on every backend)
  against XLA and the reference, forward and gradients; one bf16 train step of each
  model (its `kexue.tasks` loss) against float32; a checkpoint written on the device
  restored on CPU.
* ``studies`` (`benchmarks.accelerator_studies`): `python -m experiments.reproduce
  entropy_invariance --preset gpu` (the MLM at the config's own size, 20.5M tokens per
  run, four variants, two seeds, accuracy at 64 … 4096), then `lm_extrapolation
  --preset gpu`, as concurrent processes sharing the GPU; tables per length, mean over
  seeds and per seed.
* ``speed`` (`benchmarks.accelerator_speed`): measured bf16 matmul peak; causal-LM
  tokens/s and MFU at ~124M (AdamW, Amos, Amos-style) and ~350M parameters; kexue's
  RoFormer MLM step against Hugging Face's PyTorch `RoFormerForMaskedLM` (eager and
  `torch.compile`); the longest trainable length at batch 1 with and without remat.
* ``studies_ner`` (`benchmarks.accelerator_studies_ner`; run only when named): the
  issue-18 NER grids through `experiments.reproduce STUDY --preset gpu`, a study
  without such a preset recorded as skipped.

Adding a part:

1. A module with `run(report: PartReport) -> None` that opens one
   `with report.section(name, title) as section:` per measurement, most valuable first.
   Each section is saved when its block ends; an exception in it is recorded and the
   part goes on with the next. Inside: `section.table(header, rows, title=)`,
   `section.note(text)`, `section.check(name, passed)` (a failed check marks the
   section ``failed``), `section.record_error(what, error)` for one item that raised
   (in an `except` block; the other items go on), `section.skip(reason)`,
   `section.data[...]` for raw numbers (JSON). `report.smoke` selects toy sizes;
   `report.time_left()` / `report.deadline` bound optional work (stop early and say so
   rather than be killed).
2. A `Part` in `PARTS`: its budget (the default parts' budgets must fit
   `DEFAULT_DEADLINE_S`, 450 s: today 90 + 240 + 110, so a new default part takes time
   from another; a part outside the default run gets a command of its own, at most
   `MAX_DEADLINE_S`), its smoke budget, its `results_file`, which must hold the
   markers `<!-- accelerator-<name>:begin -->` / `<!-- accelerator-<name>:end -->`, and
   any environment its process needs (`child_env`).
3. `tests/benchmarks/test_accelerator.py` runs every default part with `--smoke` and
   requires every section ``ok``; add what the part's tables must contain.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

SCHEMA = 1
#: Two result files per part and at most 8 files come back from the GPU machine.
MAX_PARTS = 4
#: Statuses of a section or part that count as a success.
OK = "ok"
SKIPPED = "skipped"
#: Seconds kept back from the deadline for killing a part and writing its files.
MARGIN_S = 10.0
#: A part is not started with less than this many seconds before the deadline.
MIN_START_S = 20.0
LOG_TAIL_CHARS = 4000
#: The largest file the GPU machine hands back.
MAX_FILE_BYTES = 16 * 2**20
#: The repository root: the parts run from there (`python -m benchmarks.accelerator`).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the campaign.

    Attributes:
      name: file stem of its results (`<name>.json`, `<name>.md`) and `--parts` name.
      title: heading of its results.
      module: module with `run(report: PartReport) -> None`.
      budget_s: time limit of the part at full size (one H200), seconds.
      smoke_budget_s: time limit with `--smoke` (CPU).
      results_file: the repository file its tables go to (`accelerator_report`).
      in_default: run when `--parts` is not given (the 8-minute campaign); a part
        outside it runs only when named.
      child_env: environment variables of the part's process (e.g. a part whose own
        subprocesses share the GPU must not let JAX preallocate its memory).
      beside_in_smoke: the part's work runs in subprocesses it starts, its own process
        mostly waits; with `--smoke` it runs in a thread beside the other parts.
    """

    name: str
    title: str
    module: str
    budget_s: float
    smoke_budget_s: float
    results_file: str
    in_default: bool = True
    child_env: tuple[tuple[str, str], ...] = ()
    beside_in_smoke: bool = False


#: The parts in the order they run, most valuable first: correctness (cheap, and what
#: every other figure rests on), the entropy-invariance studies (the blog's headline
#: claim at the scale it needs), speed; then the issue-18 NER grids, named explicitly.
PARTS: tuple[Part, ...] = (
    Part("correctness", "GPU correctness", "benchmarks.accelerator_correctness",
         budget_s=90, smoke_budget_s=300, results_file="benchmarks/RESULTS.md"),
    Part("studies", "Entropy-invariance studies at GPU scale",
         "benchmarks.accelerator_studies", budget_s=240, smoke_budget_s=300,
         results_file="docs/results.md", beside_in_smoke=True,
         child_env=(("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)),
    Part("speed", "Speed", "benchmarks.accelerator_speed",
         budget_s=110, smoke_budget_s=300, results_file="benchmarks/RESULTS.md"),
    Part("studies_ner", "NER study grids at GPU scale (issue 18)",
         "benchmarks.accelerator_studies_ner", budget_s=520, smoke_budget_s=300,
         results_file="docs/results.md", in_default=False, beside_in_smoke=True,
         child_env=(("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)),
)
DEFAULT_PARTS = tuple(part for part in PARTS if part.in_default)
#: The default campaign's limit: under 8 minutes with room for start-up and the install.
DEFAULT_DEADLINE_S = 450.0
#: The most a campaign of other parts may take by default: one GPU-machine command runs
#: at most 10 minutes, and the wheels' install comes first.
MAX_DEADLINE_S = 560.0

if len(PARTS) > MAX_PARTS:
    raise RuntimeError(f"{len(PARTS)} parts registered; at most {MAX_PARTS} fit the 8 files "
                       "the GPU machine hands back")


def part_by_name(name: str) -> Part:
    for part in PARTS:
        if part.name == name:
            return part
    raise ValueError(f"`--parts`: expected names among {[p.name for p in PARTS]}; got {name!r}")


# ----------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_line(env: dict[str, Any]) -> str:
    """One line: date, device kind and count, backend, versions, smoke or not."""
    if not env:
        return "environment not recorded (the part ended before it started JAX)"
    versions = ", ".join(f"{name} {version}" for name, version in env.get("versions", {}).items())
    size = "**smoke run (toy sizes; not figures)**" if env.get("smoke") else "full size"
    return (f"{env.get('date', '?')}; {env.get('device_kind', '?')} × "
            f"{env.get('device_count', '?')} ({env.get('backend', '?')}); host "
            f"{env.get('host', '?')}; {versions}; {size}")


def render_part(doc: dict[str, Any], *, level: int = 2) -> str:
    """Markdown of one part's results (its JSON document)."""
    head = "#" * level
    lines = [f"{head} {doc['title']}: {doc['status']}", "",
             environment_line(doc.get("env", {})), ""]
    if doc.get("error"):
        lines += ["```", doc["error"].rstrip(), "```", ""]
    for section in doc.get("sections", []):
        elapsed = section.get("elapsed_s")
        timing = "" if elapsed is None else f", {elapsed:.1f} s"
        lines += [f"{head}# {section['title']} ({section['status']}{timing})", ""]
        for note in section.get("notes", []):
            lines += [note, ""]
        for table in section.get("tables", []):
            if table.get("title"):
                lines += [table["title"], ""]
            lines += [render_table(table["header"], table["rows"]), ""]
        for item in section.get("item_errors", []):
            lines += [f"Error in {item['what']}:", "", "```", item["traceback"].rstrip(), "```",
                      ""]
        if section.get("error"):
            lines += ["```", section["error"].rstrip(), "```", ""]
    if doc.get("log_tail"):
        lines += [f"{head}# Last output of the part's process", "", "```",
                  doc["log_tail"].rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- files


def part_paths(out: str, name: str) -> tuple[str, str]:
    return os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")


def write_part_files(out: str, doc: dict[str, Any]) -> None:
    """Writes `<part>.json` and `<part>.md` (each through a temporary file, replaced).

    A JSON text over `MAX_FILE_BYTES` (the GPU machine returns no larger file) is written
    without the sections' raw `data`, which says so; tables and notes stay."""
    json_path, md_path = part_paths(out, doc["part"])
    serialized = json.dumps(doc, indent=1, default=_json_default) + "\n"
    if len(serialized.encode()) > MAX_FILE_BYTES:
        dropped = f"dropped: the part's JSON exceeded {MAX_FILE_BYTES} bytes"
        doc = {**doc, "sections": [{**section, "data": {"note": dropped}}
                                   for section in doc["sections"]]}
        serialized = json.dumps(doc, indent=1, default=_json_default) + "\n"
    for path, text in ((json_path, serialized), (md_path, render_part(doc))):
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # NumPy and JAX scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_part(out: str, name: str) -> dict[str, Any] | None:
    path = part_paths(out, name)[0]
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- in a part


def environment(smoke: bool) -> dict[str, Any]:
    """Device kind and count, backend, host, versions and date; initialises JAX."""
    from importlib import metadata

    import jax

    devices = jax.devices()
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "host": f"{platform.machine()}, {os.cpu_count()} cpus, Python "
                f"{platform.python_version()}",
        "versions": versions,
        "smoke": smoke,
    }


class Section:
    """What one measurement reports: tables, notes, checks, raw data (JSON-able)."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.status = OK
        self.tables: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}
        self.error: str | None = None
        self.elapsed_s: float | None = None
        self.failed_checks: list[str] = []
        self.item_errors: list[dict[str, str]] = []

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], *,
              title: str = "") -> None:
        self.tables.append({"title": title, "header": list(header),
                            "rows": [list(row) for row in rows]})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, name: str, passed: bool) -> bool:
        """Records a pass/fail check; a failed one marks the section ``failed``."""
        if not passed:
            self.failed_checks.append(name)
            if self.status == OK:
                self.status = "failed"
        return passed

    def record_error(self, what: str, error: BaseException) -> str:
        """Records an exception raised by one item of the section, which goes on with its
        other items; marks the section ``error``. Call it inside the `except` block.
        Returns a one-line description for the item's table cell."""
        message = str(error).strip().splitlines()
        line = type(error).__name__ + (f": {message[0][:200]}" if message else "")
        self.status = "error"
        self.item_errors.append({"what": what, "error": line,
                                 "traceback": traceback.format_exc(limit=8)[-LOG_TAIL_CHARS:]})
        print(f"{what}: {self.item_errors[-1]['traceback']}", file=sys.stderr, flush=True)
        return line

    def skip(self, reason: str) -> None:
        self.status = SKIPPED
        self.note(f"Skipped: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "status": self.status,
                "elapsed_s": self.elapsed_s, "notes": self.notes, "tables": self.tables,
                "failed_checks": self.failed_checks, "item_errors": self.item_errors,
                "data": self.data, "error": self.error}


class PartReport:
    """A part's results, rewritten to `DIR/<part>.json` and `.md` after every section."""

    def __init__(self, part: Part, out: str, *, smoke: bool, deadline: float):
        self.part, self.out, self.smoke, self.deadline = part, out, smoke, deadline
        self.started = time.time()
        self.sections: list[Section] = []
        self.env: dict[str, Any] = {}
        self.status = "running"
        self.error: str | None = None

    def time_left(self) -> float:
        """Seconds until this part's budget is spent."""
        return self.deadline - time.time()

    def document(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "part": self.part.name, "title": self.part.title,
                "status": self.status, "env": self.env,
                "started": datetime.datetime.fromtimestamp(self.started, datetime.UTC)
                .isoformat(timespec="seconds"),
                "elapsed_s": round(time.time() - self.started, 2),
                "sections": [s.as_dict() for s in self.sections], "error": self.error,
                "log_tail": None}

    def save(self) -> None:
        write_part_files(self.out, self.document())

    @contextlib.contextmanager
    def section(self, name: str, title: str) -> Iterator[Section]:
        """A measurement; saved when the block ends. An exception inside is recorded
        (type, message, traceback) as the section's ``error`` status and the part goes
        on with its next section; the part's status then says ``error``."""
        section = Section(name, title)
        self.sections.append(section)
        start = time.perf_counter()
        print(f"[{self.part.name}] {title} ...", flush=True)
        try:
            yield section
        except Exception:
            section.status = "error"
            section.error = traceback.format_exc(limit=8)[-LOG_TAIL_CHARS:]
            print(section.error, file=sys.stderr, flush=True)
        finally:
            section.elapsed_s = round(time.perf_counter() - start, 2)
            print(f"[{self.part.name}] {title}: {section.status} ({section.elapsed_s} s)",
                  flush=True)
            self.save()

    def finish(self) -> None:
        statuses = {s.status for s in self.sections}
        self.status = ("error" if "error" in statuses else
                       "failed" if "failed" in statuses else OK)
        self.save()


def run_part_here(part: Part, out: str, *, smoke: bool, deadline: float) -> int:
    """Runs one part in this process (the campaign's child); returns the exit status."""
    report = PartReport(part, out, smoke=smoke, deadline=deadline)
    report.save()
    try:
        report.env = environment(smoke)
        module = importlib.import_module(part.module)
        module.run(report)
    except Exception:
        report.error = traceback.format_exc(limit=12)[-LOG_TAIL_CHARS:]
        report.status = "error"
        report.save()
        print(report.error, file=sys.stderr, flush=True)
        return 1
    report.finish()
    return 0 if report.status == OK else 1


# ----------------------------------------------------------------------------- campaign


def _tail(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-LOG_TAIL_CHARS:]


def _finalize_after_child(part: Part, out: str, returncode: int | None, timed_out: bool,
                          log_path: str, timeout_s: float) -> dict[str, Any]:
    """The part's document after its process ended (or was killed): marks a timeout or
    a crash, attaches the output tail to anything but success, and rewrites its files."""
    for stray in part_paths(out, part.name):
        if os.path.exists(stray + ".tmp"):
            os.remove(stray + ".tmp")
    doc = read_part(out, part.name) or {
        "schema": SCHEMA, "part": part.name, "title": part.title, "status": "error",
        "env": {}, "sections": [], "error": None, "log_tail": None}
    if timed_out:
        doc["status"] = "timeout"
        doc["error"] = (f"killed at its time budget of {timeout_s:.0f} s; the sections "
                        "listed finished before")
    elif doc["status"] == "running":
        doc["status"] = "error"
        doc["error"] = f"the part's process ended with status {returncode} before finishing"
    if doc["status"] != OK:
        doc["log_tail"] = _tail(log_path)
    write_part_files(out, doc)
    return doc


def _not_started(part: Part, out: str, available: float, deadline_s: float) -> str:
    doc = {"schema": SCHEMA, "part": part.name, "title": part.title, "status": "timeout",
           "env": {}, "sections": [], "log_tail": None,
           "error": f"not started: {available:.0f} s were left of the campaign's deadline "
                    f"({deadline_s:.0f} s)"}
    write_part_files(out, doc)
    return doc["status"]


def _summary(statuses: dict[str, str]) -> int:
    print("campaign: " + ", ".join(f"{name} {status}" for name, status in statuses.items()),
          flush=True)
    return 0 if all(status == OK for status in statuses.values()) else 1


def run_campaign(parts: Sequence[Part], out: str, *, smoke: bool, deadline_s: float) -> int:
    """Runs `parts` in order, each in a child process killed at its budget; returns the
    exit status."""
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    deadline = time.time() + deadline_s
    statuses = {}
    for part in parts:
        budget = part.smoke_budget_s if smoke else part.budget_s
        available = deadline - time.time() - MARGIN_S
        if available < MIN_START_S:
            statuses[part.name] = _not_started(part, out, available, deadline_s)
            continue
        timeout = min(budget, available)
        command = [sys.executable, "-m", "benchmarks.accelerator", "--child", part.name,
                   "--child-module", part.module, "--child-title", part.title, "--out", out,
                   "--deadline", f"{time.time() + timeout:.3f}"]
        if smoke:
            command.append("--smoke")
        print(f"== part {part.name} (budget {timeout:.0f} s)", flush=True)
        with tempfile.NamedTemporaryFile("w+", suffix=f"-{part.name}.log",
                                         delete=False) as log:
            log_path = log.name
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPOSITORY, start_new_session=True,
                                     env={**os.environ, **dict(part.child_env)})
            timed_out = False
            try:
                returncode = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)  # the part and anything it started
                returncode = child.wait()
        print(_tail(log_path), flush=True)
        doc = _finalize_after_child(part, out, returncode, timed_out, log_path, timeout)
        os.remove(log_path)
        statuses[part.name] = doc["status"]
        print(f"== part {part.name}: {doc['status']}", flush=True)
    return _summary(statuses)


#: Imported before the parts' threads start (see `run_in_process`).
THREAD_SAFE_IMPORTS = ("tensorflow_datasets", "grain", "orbax.checkpoint", "kexue.data.pipeline",
                       "kexue.train", "kexue.saved")


def run_in_process(parts: Sequence[Part], out: str, *, smoke: bool, deadline_s: float) -> int:
    """Runs `parts` in this process (`--smoke`); returns the exit status.

    The parts marked `beside_in_smoke` (their work is in subprocesses they start) run
    in threads started first; the others run one after the other meanwhile, so the
    CPU cores serve both. Nothing is killed: each part's budget is its
    `report.deadline`, which it keeps itself (the studies stop their processes there).
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    # TFDS and Orbax load some modules under etils' `lazy_imports`, which swaps the
    # process-wide `__import__` while they load: an import in another thread at that
    # moment gets a `LazyModule` placeholder (seen as "'LazyModule' object is not
    # callable" in a part beside the studies). They are imported here, before any thread.
    for name in THREAD_SAFE_IMPORTS:
        importlib.import_module(name)
    start = time.time()
    deadline = start + deadline_s
    threads = []
    for part in parts:
        if part.beside_in_smoke:
            timeout = min(part.smoke_budget_s if smoke else part.budget_s, deadline_s)
            print(f"== part {part.name} (in a thread of this process, budget "
                  f"{timeout:.0f} s)", flush=True)
            thread = threading.Thread(target=run_part_here, args=(part, out), kwargs={
                "smoke": smoke, "deadline": start + timeout}, name=f"part-{part.name}")
            thread.start()
            threads.append(thread)
    for part in parts:
        if part.beside_in_smoke:
            continue
        available = deadline - time.time() - MARGIN_S
        if available < MIN_START_S:
            _not_started(part, out, available, deadline_s)
            continue
        timeout = min(part.smoke_budget_s if smoke else part.budget_s, available)
        print(f"== part {part.name} (in this process, budget {timeout:.0f} s)", flush=True)
        run_part_here(part, out, smoke=smoke, deadline=time.time() + timeout)
        print(f"== part {part.name}: {read_part(out, part.name)['status']}", flush=True)
    for thread in threads:
        thread.join()
    return _summary({part.name: read_part(out, part.name)["status"] for part in parts})


def default_deadline(parts: Sequence[Part], smoke: bool) -> float:
    """The campaign's limit when `--deadline-s` is not given: `DEFAULT_DEADLINE_S` for
    parts of the default campaign; otherwise the parts' budgets and margins added up,
    at most `MAX_DEADLINE_S` (with `--smoke`, the smoke budgets, uncapped)."""
    if smoke:
        return sum(p.smoke_budget_s + MARGIN_S for p in parts)
    if all(p.in_default for p in parts):
        return DEFAULT_DEADLINE_S
    return min(sum(p.budget_s + MARGIN_S for p in parts), MAX_DEADLINE_S)


#: With `--smoke` (CPU, toy sizes: compiling is nearly all the time) XLA:CPU skips its
#: LLVM optimisation, which shortens each compilation several-fold; the results are
#: the same functions, computed by less optimised machine code.
SMOKE_XLA_FLAG = "--xla_backend_optimization_level=0"


@contextlib.contextmanager
def compilation_cache(smoke: bool) -> Iterator[None]:
    """A persistent compilation cache shared by every part and process of the campaign
    (`JAX_COMPILATION_CACHE_DIR`, a temporary directory removed at the end, unless the
    caller set one): a program compiled again — the same step built twice, the
    evaluation steps of several runs — is read back instead. With `smoke` every
    program is cached (on CPU they compile in well under JAX's default 1 s minimum)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        yield
        return
    saved = {key: os.environ.get(key) for key in (
        "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    directory = tempfile.mkdtemp(prefix="kexue-accelerator-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    if smoke:
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for <part>.json / <part>.md")
    parser.add_argument("--parts", default=",".join(p.name for p in DEFAULT_PARTS),
                        help="comma-separated parts, run in registry order (default: "
                             f"{','.join(p.name for p in DEFAULT_PARTS)}; also: "
                             f"{','.join(p.name for p in PARTS if not p.in_default)})")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on CPU, every part in this one process")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help=f"the whole campaign's time limit in seconds (default "
                             f"{DEFAULT_DEADLINE_S:.0f} for the default parts; else their "
                             f"budgets added up, at most {MAX_DEADLINE_S:.0f}; with --smoke "
                             "the smoke budgets added up)")
    # The campaign starts each part as a child process with these:
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-module", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-title", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        part = Part(args.child, args.child_title, args.child_module, budget_s=0,
                    smoke_budget_s=0, results_file="")
        return run_part_here(part, args.out, smoke=args.smoke,
                             deadline=args.deadline or time.time() + 3600)
    wanted = {part_by_name(name).name for name in args.parts.split(",") if name}
    if not wanted:
        raise ValueError(f"`--parts`: expected at least one of {[p.name for p in PARTS]}; "
                         f"got {args.parts!r}")
    parts = [p for p in PARTS if p.name in wanted]
    deadline_s = args.deadline_s
    if deadline_s is None:
        deadline_s = default_deadline(parts, args.smoke)
    if not deadline_s > 0:
        raise ValueError(f"`--deadline-s`: expected a positive number; got {deadline_s}")
    if args.smoke:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {SMOKE_XLA_FLAG}".strip()
    run = run_in_process if args.smoke else run_campaign
    with compilation_cache(args.smoke):
        return run(parts, args.out, smoke=args.smoke, deadline_s=deadline_s)


if __name__ == "__main__":
    sys.exit(main())
