"""Reproduce a claim of the blog: one command per study, a table and a plot in docs/results/.

    python -m experiments.reproduce STUDY [--seeds 0 1 2] [--steps N]
        [--preset default|smoke|...] [--out docs/results] [--runs runs/reproduce]
    python -m experiments.reproduce STUDY --list-presets    # the presets, as JSON

Each study lives in `experiments/studies/<module>.py` (see `STUDIES`) and says what it
trains and measures in its docstring. Runs go through the same building blocks as
`python -m experiments.train` (`experiments.run` and `kexue.train.train_loop`), in
this one process, each into its own workdir under `--runs` (kept out of git); the
equivalent `experiments.train` command of each run is recorded in the JSON. A run whose
workdir already holds the finished run with the same resolved config is read back
instead of trained again, so an interrupted study picks up where it stopped.

Outputs in `--out`: `<study>.json` (every number, per seed), `<study>.md` (the table:
mean ± sample standard deviation over seeds) and `<study>.png` (the plot). With the
default `--out`, the generated block between the study's markers in `docs/results.md`
is refreshed too (the hand-written reading around it is left alone); with `--out
docs/results/NAME` (a second preset kept beside the default one), the block between
the `NAME` markers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
DEFAULT_RUNS = ROOT / "runs" / "reproduce"
RESULTS_MD = ROOT / "docs" / "results.md"

#: study name -> module defining `PRESETS`, `run`, `plot`, `markdown`
#: (imported only when the study is chosen).
STUDIES: dict[str, str] = {
    "entropy_invariance": "experiments.studies.entropy_invariance",
    "globalpointer": "experiments.studies.globalpointer",
    "rdrop": "experiments.studies.rdrop",
    "lm_extrapolation": "experiments.studies.lm_extrapolation",
    "multilabel": "experiments.studies.multilabel",
    "optimizers": "experiments.studies.optimizers",
}


def load_study(name: str) -> ModuleType:
    return importlib.import_module(STUDIES[name])


def _update_results_md(path: Path, study: str, block: str) -> bool:
    """Replaces the text between `<!-- study:begin -->` and `<!-- study:end -->`."""
    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {study}:begin -->", f"<!-- {study}:end -->"
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{block}\n{end}{tail}", encoding="utf-8")
    return True


def results_block(out: Path, study: str) -> tuple[str | None, str | None]:
    """`(marker, folder)`: the block of docs/results.md that a study written to `out`
    refreshes, and its plot's folder relative to docs/. The default `--out` refreshes the
    study's block; a folder inside it (a second preset kept beside the default one, e.g.
    docs/results/rdrop_overfit) the block named after that folder; any other, none."""
    if out.resolve() == DEFAULT_OUT.resolve():
        return study, "results"
    if out.resolve().parent == DEFAULT_OUT.resolve():
        return out.name, f"results/{out.name}"
    return None, None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: the preset's)")
    parser.add_argument("--preset", default="default",
                        help="the study's preset: 'default' (the published numbers) or "
                             "'smoke' (a tiny plumbing check); some studies have more")
    parser.add_argument("--out", default=os.fspath(DEFAULT_OUT),
                        help="where the table, JSON and plot go")
    parser.add_argument("--runs", default=os.fspath(DEFAULT_RUNS),
                        help="where the training runs (workdirs) go")
    parser.add_argument("--list-presets", action="store_true",
                        help="print the study's presets (a JSON list) and exit")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1; got {args.steps}")
    presets = sorted(load_study(args.study).PRESETS)
    if args.list_presets:
        print(json.dumps(presets), flush=True)
        parser.exit()
    if args.preset not in presets:
        parser.error(f"--preset for study {args.study!r} must be one of {presets}; "
                     f"got {args.preset!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from kexue.train import machine_description, today

    study = load_study(args.study)
    record = study.run(args)
    record.update(date=today(), machine=machine_description(),
                  command=shlex.join(["python", "-m", "experiments.reproduce", *argv]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.study}.json").write_text(json.dumps(record, indent=2) + "\n")
    study.plot(record, out / f"{args.study}.png")
    text = study.markdown(record, f"{args.study}.png")
    (out / f"{args.study}.md").write_text(text)
    print(text, flush=True)
    marker, folder = results_block(out, args.study)
    if marker is not None:
        block = text.split("\n", 1)[1].strip().replace(
            f"]({args.study}.png)", f"]({folder}/{args.study}.png)")
        if _update_results_md(RESULTS_MD, marker, block):
            print(f"[reproduce] updated {RESULTS_MD}", flush=True)
    return record


if __name__ == "__main__":
    main()
