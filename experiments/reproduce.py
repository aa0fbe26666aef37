"""Reproduce a claim of the blog: one command per study, a table and a plot in docs/results/.

    python -m experiments.reproduce entropy_invariance [--seeds 0 1 2] [--steps N]
        [--preset default|smoke] [--out docs/results] [--runs runs/reproduce]

Studies:

* `entropy_invariance` (SPEC §3 and §7, kexue.fm archives 8823 and 9444): RoFormer MLM
  trained at length 64 on the byte-level stdlib corpus (`configs/mlm_extrapolation.py`)
  for the four variants attention scale ∈ {standard, entropy_invariant} × training
  positions ∈ {contiguous, random_equal_mean}, one run per seed; masked-token accuracy
  at evaluation lengths 64 … 1024 (`final_metrics.json`, `eval/accuracy_<L>`).

Each run goes through the same building blocks as `python -m experiments.train`
(`experiments._build` and `kexue.train.train_loop`), in this one process, into its own
workdir under `--runs` (kept out of git); the equivalent `experiments.train` command
of each run is recorded in the JSON. A run whose workdir already holds the finished
run with the same resolved config is read back instead of trained again, so an
interrupted study picks up where it stopped.

Outputs in `--out`: `<study>.json` (every number, per seed), `<study>.md` (the table:
mean ± sample standard deviation over seeds) and `<study>.png` (the plot). With the
default `--out`, the generated block between the study's markers in `docs/results.md`
is refreshed too (the hand-written reading around it is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
DEFAULT_RUNS = ROOT / "runs" / "reproduce"
RESULTS_MD = ROOT / "docs" / "results.md"

# ----------------------------------------------------------------------------- study 1

MLM_CONFIG = "configs/mlm_extrapolation.py"
LENGTHS = (64, 128, 256, 512, 1024)
#: (name, model.attention_scale, objective.positions)
EI_VARIANTS = (
    ("standard", "standard", "contiguous"),
    ("standard + random positions", "standard", "random_equal_mean"),
    ("entropy-invariant", "entropy_invariant", "contiguous"),
    ("entropy-invariant + random positions", "entropy_invariant", "random_equal_mean"),
)
#: Study presets: (the config file's preset, overrides, default steps). The config
#: file's "full" model (width 256, 4 layers, 5000 steps) takes hours per run on a
#: 2-core CPU; "default" is the small model the published numbers were taken with.
EI_PRESETS: dict[str, tuple[str, dict[str, Any], int]] = {
    "default": ("full", {
        "model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
        "model.mlp_dim": 512, "data.batch_size": 32, "data.eval_batches": 4,
    }, 500),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "data.eval_batches": 1,
        "optimizer.name": "adamw", "train.tensorboard": False,
    }, 2),
}


def _ei_overrides(preset: str, steps: int, seed: int, scale: str,
                  positions: str) -> dict[str, Any]:
    _, overrides, _ = EI_PRESETS[preset]
    return {
        **overrides,
        "model.attention_scale": scale,
        "objective.positions": positions,
        "eval.lengths": LENGTHS,
        "seed": seed, "train.seed": seed, "data.seed": seed,
        "train.num_steps": steps,
        "train.log_every": max(steps // 10, 1),
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.keep_checkpoints": 1,
        # The config's Amos-style decay (half-life 2000 of 5000 steps), at this length.
        "optimizer.amos_style.half_life": max(round(0.4 * steps), 1),
    }


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def train_command(config_file: str, workdir: str | os.PathLike, preset: str,
                  overrides: Mapping[str, Any]) -> str:
    """The `python -m experiments.train` command that trains the same run."""
    args = ["python", "-m", "experiments.train", "--config",
            config_file if preset == "full" else f"{config_file}:{preset}",
            "--workdir", os.fspath(workdir)]
    args += [f"--config.{key}={_flag_value(value)}" for key, value in overrides.items()]
    return shlex.join(args)


def _load_config_module(config_file: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kexue_reproduce_config",
                                                  ROOT / config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_run(config_file: str, preset: str, overrides: Mapping[str, Any],
              workdir: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains one run as `experiments.train` would (or reads it back); `final_metrics.json`."""
    from experiments import _build
    from kexue.parallel import mesh_from_config
    from kexue.train import train_loop

    config = _load_config_module(config_file).get_config()
    config.preset = preset
    config.update_from_flattened_dict(dict(overrides))  # file < command line …
    config = _build.resolve_config(config, _build.load_presets(str(ROOT / config_file)),
                                   overrides)           # … < preset < command line
    _build.check_config(config)
    mesh = mesh_from_config(config)
    _build.check_against_mesh(config, mesh)
    task = _build.build_task(config, mesh)
    final_path = workdir / "final_metrics.json"
    saved_path = workdir / _build.CONFIG_FILE
    if final_path.exists() and saved_path.exists():
        saved = json.loads(saved_path.read_text())
        final = json.loads(final_path.read_text())
        wanted = json.loads(task.config.to_json_best_effort(sort_keys=True))
        if saved == wanted and final.get("step") == int(config.train.num_steps):
            log(f"[reproduce]   finished run found in {workdir}: reusing it")
            return {**final, "reused": True}
    tx = _build.build_optimizer(task.config, task.model_factory)
    _build.save_config(task.config, os.fspath(workdir))
    train_loop(model_factory=task.model_factory, loss_fn=task.loss_fn, tx=tx,
               train_data=task.train_data, mesh=mesh, config=task.config.train,
               workdir=os.fspath(workdir), eval_data=task.eval_data, eval_fn=task.eval_fn,
               tokens_in=task.tokens_in, log=lambda message: None)
    return json.loads(final_path.read_text())


def _summary(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one seed)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def _cell(mean: float, spread: float | None) -> str:
    return f"{100 * mean:.2f}" + ("" if spread is None else f" ± {100 * spread:.2f}")


def entropy_invariance(args: argparse.Namespace) -> dict[str, Any]:
    """Study 1: trains the 4 variants × seeds; returns the results record."""
    config_preset, _, default_steps = EI_PRESETS[args.preset]
    steps = args.steps or default_steps
    runs_root = Path(args.runs) / "entropy_invariance" / f"{args.preset}-{steps}steps"
    variants: dict[str, Any] = {}
    started = time.perf_counter()
    for name, scale, positions in EI_VARIANTS:
        per_seed: dict[str, dict[str, float]] = {}
        commands, seconds, reused = {}, {}, []
        for seed in args.seeds:
            overrides = _ei_overrides(args.preset, steps, seed, scale, positions)
            workdir = runs_root / f"{scale}-{positions}-seed{seed}"
            print(f"[reproduce] {name}, seed {seed}: {workdir}", flush=True)
            run_started = time.perf_counter()
            final = train_run(MLM_CONFIG, config_preset, overrides, workdir)
            seconds[str(seed)] = round(time.perf_counter() - run_started, 1)
            if final.get("reused"):
                reused.append(seed)
            per_seed[str(seed)] = {str(n): float(final["eval"][f"accuracy_{n}"])
                                   for n in LENGTHS}
            commands[str(seed)] = train_command(MLM_CONFIG, workdir, config_preset, overrides)
            print("[reproduce]   accuracy " + "  ".join(
                f"{n}: {100 * per_seed[str(seed)][str(n)]:.2f}" for n in LENGTHS)
                + f"  ({seconds[str(seed)]:.0f} s)", flush=True)
        mean, spread = {}, {}
        for n in LENGTHS:
            mean[str(n)], spread[str(n)] = _summary([acc[str(n)] for acc in per_seed.values()])
        variants[name] = {"attention_scale": scale, "positions": positions,
                          "accuracy": per_seed, "mean": mean, "std": spread,
                          "run_seconds": seconds, "reused_seeds": reused,
                          "train_commands": commands}
    _, preset_overrides, _ = EI_PRESETS[args.preset]
    return {
        "study": "entropy_invariance",
        "title": "Entropy-invariant attention and length extrapolation (MLM accuracy)",
        "spec": "SPEC §3, §7; kexue.fm archives 8823, 9444",
        "config": MLM_CONFIG, "preset": args.preset, "config_preset": config_preset,
        "model_and_data": preset_overrides, "steps": steps, "seeds": list(args.seeds),
        "train_length": 64, "lengths": list(LENGTHS), "metric": "masked-token accuracy",
        "variants": variants, "runtime_s": round(time.perf_counter() - started, 1),
    }


def _ei_table(record: Mapping[str, Any]) -> str:
    lengths = record["lengths"]
    lines = ["| variant | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, variant in record["variants"].items():
        cells = [_cell(variant["mean"][str(n)], variant["std"][str(n)]) for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ei_plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = record["lengths"]
    styles = {"standard": ("tab:blue", "-"), "entropy_invariant": ("tab:red", "-")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for index, (name, variant) in enumerate(record["variants"].items()):
        color, _ = styles[variant["attention_scale"]]
        line = "--" if variant["positions"] == "random_equal_mean" else "-"
        x = np.array(lengths) * 2.0 ** (0.03 * (index - 1.5))  # apart, so bars show
        mean = np.array([100 * variant["mean"][str(n)] for n in lengths])
        std = np.array([100 * (variant["std"][str(n)] or 0.0) for n in lengths])
        ax.errorbar(x, mean, yerr=std if std.any() else None, color=color,
                    linestyle=line, marker="o", markersize=4, capsize=3, label=name)
    ax.axvline(record["train_length"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("evaluation length (tokens); trained at 64")
    ax.set_ylabel("MLM accuracy (%)")
    seeds = len(record["seeds"])
    ax.set_title(f"RoFormer MLM, {record['steps']} steps, {seeds} seed{'s' * (seeds > 1)}"
                 + (" (mean ± std)" if seeds > 1 else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ei_markdown(record: Mapping[str, Any], png_name: str) -> str:
    seeds = record["seeds"]
    reused = sum(len(v.get("reused_seeds", ())) for v in record["variants"].values())
    total = len(seeds) * len(record["variants"])
    runtime = f"total {record['runtime_s'] / 60:.1f} min" + (
        f"; {reused} of {total} runs read back from an earlier invocation" if reused else "")
    spread = ("mean ± sample standard deviation over seeds " + ", ".join(map(str, seeds))
              if len(seeds) > 1 else f"one seed ({seeds[0]}), no spread")
    model = ", ".join(f"`{k}={_flag_value(v)}`" for k, v in record["model_and_data"].items())
    return "\n".join([
        f"# {record['title']}",
        "",
        f"- Date: {record['date']}; machine: {record['machine']}",
        f"- Command: `{record['command']}` ({runtime})",
        f"- `{record['config']}` (preset `{record['preset']}`: {model}), "
        f"{record['steps']} steps at length {record['train_length']}, "
        f"MLM accuracy (%) on held-out stdlib files; {spread}.",
        "",
        _ei_table(record),
        "",
        f"![accuracy vs evaluation length]({png_name})",
        "",
    ])


# ----------------------------------------------------------------------------- driver

STUDIES: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]],
                         Callable[[Mapping[str, Any], Path], None],
                         Callable[[Mapping[str, Any], str], str]]] = {
    "entropy_invariance": (entropy_invariance, _ei_plot, _ei_markdown),
}


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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: the preset's)")
    parser.add_argument("--preset", default="default", choices=sorted(EI_PRESETS))
    parser.add_argument("--out", default=os.fspath(DEFAULT_OUT),
                        help="where the table, JSON and plot go")
    parser.add_argument("--runs", default=os.fspath(DEFAULT_RUNS),
                        help="where the training runs (workdirs) go")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1; got {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from benchmarks.common import machine_description, today

    run, plot, markdown = STUDIES[args.study]
    record = run(args)
    record.update(date=today(), machine=machine_description(),
                  command=shlex.join(["python", "-m", "experiments.reproduce", *argv]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.study}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out / f"{args.study}.png")
    text = markdown(record, f"{args.study}.png")
    (out / f"{args.study}.md").write_text(text)
    print(text, flush=True)
    if out.resolve() == DEFAULT_OUT.resolve():
        block = text.split("\n", 1)[1].strip().replace(
            f"]({args.study}.png)", f"](results/{args.study}.png)")
        if _update_results_md(RESULTS_MD, args.study, block):
            print(f"[reproduce] updated {RESULTS_MD}", flush=True)
    return record


if __name__ == "__main__":
    main()
