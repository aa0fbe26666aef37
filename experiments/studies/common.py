"""Shared plumbing of the reproduction studies (`python -m experiments.reproduce`).

A study module in this package defines `PRESETS` (the names `--preset` accepts; at
least "default" and "smoke"), `run(args) -> record`, `plot(record, path)` and
`markdown(record, png_name) -> str`; the driver adds `date`, `machine` and `command`
to the record and writes `<study>.json`, `<study>.png` and `<study>.md`.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def repository_path(path: str | os.PathLike) -> str:
    """`path` relative to the repository root when it lies inside it (so records name
    no absolute path of the machine that wrote them), else `path` as given."""
    resolved = Path(os.path.abspath(path))
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return os.fspath(path)


def train_command(config_file: str, workdir: str | os.PathLike, preset: str,
                  overrides: Mapping[str, Any]) -> str:
    """The `python -m experiments.train` command that trains the same run, run from
    the repository root (a workdir inside the repository is given relative to it)."""
    args = ["python", "-m", "experiments.train", "--config",
            config_file if preset == "full" else f"{config_file}:{preset}",
            "--workdir", repository_path(workdir)]
    args += [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]
    return shlex.join(args)


def study_config(config_file: str, preset: str,
                 overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config_file`'s `get_config(preset)` with `overrides`, checked (as `train` would)."""
    from experiments import config as experiment_config

    config = experiment_config.load(os.fspath(ROOT / config_file), preset=preset,
                                    overrides=overrides)
    experiment_config.check(config)
    return config


def train_run(config_file: str, preset: str, overrides: Mapping[str, Any],
              workdir: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains one run as `experiments.train` would (or reads it back); `final_metrics.json`."""
    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.train import (
        WorkdirError,
        WorkdirLock,
        abstract_train_state,
        check_resume,
        read_final_metrics,
    )

    config = study_config(config_file, preset, overrides)
    final_path = workdir / "final_metrics.json"
    saved_path = workdir / experiment_config.CONFIG_FILE
    if final_path.exists() and saved_path.exists():
        saved = json.loads(saved_path.read_text())
        wanted = json.loads(config.to_json_best_effort(sort_keys=True))
        try:  # an incomplete record (no final evaluation) is never reused
            final = read_final_metrics(workdir)
        except WorkdirError:
            final = {}
        if saved == wanted and final.get("step") == int(config.train.num_steps):
            log(f"[reproduce]   finished run found in {workdir}: reusing it")
            return {**final, "reused": True}
    run = experiment_run.build(config)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(os.fspath(workdir)):
        check_resume(os.fspath(workdir), abstract_train_state(
            run.model_factory, run.tx, run.mesh, seed=run.loop.seed))
        experiment_config.save(config, os.fspath(workdir))
        experiment_run.train(run, workdir, log=lambda message: None)
    if not final_path.exists():  # stopped by SIGTERM/SIGINT: checkpoint saved, not finished
        raise RuntimeError(f"the run in {workdir} stopped before its last step (a "
                           "preemption signal); its checkpoint is saved: rerun the same "
                           "command to resume it and finish the study")
    return read_final_metrics(workdir)


def summary(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one seed)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def cell(mean: float, spread: float | None) -> str:
    return f"{100 * mean:.2f}" + ("" if spread is None else f" ± {100 * spread:.2f}")


def runtime_text(runtime_s: float, reused: int, total: int) -> str:
    """"total 9.7 min; 5 of 13 runs read back from an earlier invocation"."""
    return f"total {runtime_s / 60:.1f} min" + (
        f"; {reused} of {total} runs read back from an earlier invocation" if reused else "")


def spread_text(seeds: Sequence[int]) -> str:
    """How the tables' ± reads for these seeds."""
    if len(seeds) > 1:
        return "mean ± sample standard deviation over seeds " + ", ".join(map(str, seeds))
    return f"one seed ({seeds[0]}), no spread"


def overrides_text(overrides: Mapping[str, Any]) -> str:
    """`key=value` flags of a preset's overrides, as the tables list them."""
    return ", ".join(f"`{key}={flag_value(value)}`" for key, value in overrides.items())


def header_lines(record: Mapping[str, Any]) -> list[str]:
    """Title, date and machine, and the command with its runtime, of a study's table.

    `record["variants"]` maps each variant to a dict whose `reused_seeds` lists the
    seeds read back from an earlier invocation.
    """
    variants = record["variants"]
    reused = sum(len(v.get("reused_seeds", ())) for v in variants.values())
    runtime = runtime_text(record["runtime_s"], reused, len(record["seeds"]) * len(variants))
    return [f"# {record['title']}", "",
            f"- Date: {record['date']}; machine: {record['machine']}",
            f"- Command: `{record['command']}` ({runtime})"]



def seeds_label(seeds: Sequence[int], several: str = "") -> str:
    """"3 seeds" + `several` (e.g. " (mean ± std)"), or "1 seed": for plot titles."""
    count = len(seeds)
    return f"{count} seed{'s' * (count > 1)}" + (several if count > 1 else "")


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Lays out `fig`, writes it to `path` and closes it (matplotlib keeps figures)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def timed_train_run(label: str, config_file: str, preset: str, overrides: Mapping[str, Any],
                    workdir: Path) -> tuple[dict[str, Any], float]:
    """`train_run` announced as `[reproduce] label: workdir`, with its wall seconds."""
    print(f"[reproduce] {label}: {workdir}", flush=True)
    started = time.perf_counter()
    final = train_run(config_file, preset, overrides, workdir)
    return final, round(time.perf_counter() - started, 1)


def eval_curve(workdir: Path) -> dict[str, dict[str, float]]:
    """`{step: {metric: value}}` of every dev evaluation in `<workdir>/metrics.jsonl`
    (steps as strings, in training order)."""
    curve: dict[str, dict[str, float]] = {}
    with open(workdir / "metrics.jsonl", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            if row.get("split") == "eval":
                curve[str(row["step"])] = {key: float(value) for key, value in row.items()
                                           if key not in ("step", "time", "split")}
    return curve


def best_evaluation(curve: Mapping[str, Mapping[str, float]],
                    key: str = "f1") -> tuple[int, dict[str, float]]:
    """`(step, metrics)` of the evaluation with the highest `key` (the earliest on a tie),
    as a run that keeps its best checkpoint would report it.

    Raises:
      ValueError: `curve` holds no evaluation with `key`.
    """
    scored = [(int(step), dict(metrics)) for step, metrics in curve.items() if key in metrics]
    if not scored:
        raise ValueError(f"curve must hold at least one evaluation with {key!r}; got steps "
                         f"{sorted(curve)}")
    return max(scored, key=lambda item: (item[1][key], -item[0]))


def run_schedule(seed: int, steps: int, *, log_points: int, eval_every: int | None = None,
                 checkpoint_every: int | None = None) -> dict[str, Any]:
    """The overrides every study run shares: one seed for model, training and data;
    `steps` steps, logged about `log_points` times; evaluated every `eval_every` steps
    and checkpointed every `checkpoint_every` (both default: at the end only); one
    checkpoint kept."""
    return {
        "seed": seed, "train.seed": seed, "data.seed": seed,
        "train.num_steps": steps,
        "train.log_every": max(steps // log_points, 1),
        "train.eval_every": eval_every or steps,
        "train.checkpoint_every": checkpoint_every or steps,
        "train.keep_checkpoints": 1,
    }
