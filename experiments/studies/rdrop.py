"""Study 4: R-Drop with the GlobalPointer symmetric KL on CLUENER (kexue.fm/archives/8496, 9039).

The GlobalPointer (RoPE) model of study 2 (`configs/cluener_globalpointer.py`, the
same small character-level encoder from scratch, dropout 0.1) trained with and
without R-Drop (kexue.fm/archives/8496): each step runs two forward passes with
different dropout masks and minimises `½ (L₁ + L₂) + (α / 4) · D(s, t)`, `L` the ZLPR
loss and `D` the GlobalPointer divergence `Σ (σ(s) − σ(t)) (s − t)` of archive 9039
(`objective.rdrop_alpha = α`; α = 4 as in archive 8496; 0 = one pass, plain ZLPR).
Dev span F1 through training (`metrics.jsonl`, `eval/f1` every steps/4) and at the
end, one run per seed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.studies.common import (
    cell,
    header_lines,
    overrides_text,
    run_schedule,
    save_figure,
    seeds_label,
    spread_text,
    summary,
    timed_train_run,
    train_command,
)

GP_CONFIG = "configs/cluener_globalpointer.py"
ALPHA = 4.0  # archive 8496: "α = 4, not tuned"
#: (name, objective.rdrop_alpha)
RDROP_VARIANTS = (("GlobalPointer", 0.0), (f"GlobalPointer + R-Drop (α = {ALPHA:g})", ALPHA))
#: Study presets: (the config file's preset, overrides, default steps). "default" is
#: the encoder of study 2 (`experiments/studies/globalpointer.py`).
PRESETS: dict[str, tuple[str, dict[str, Any], int]] = {
    "default": ("full", {
        "model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
        "model.mlp_dim": 512, "data.batch_size": 32, "model.dropout_rate": 0.1,
    }, 400),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "optimizer.name": "adamw",
        "model.dropout_rate": 0.1, "train.tensorboard": False,
    }, 2),
}
EVALS = 4  # dev evaluations per run (every steps / EVALS)


def _optimizer_text(overrides: Mapping[str, Any]) -> str:
    if overrides.get("optimizer.name", "amos_style") != "amos_style":
        return f"{overrides['optimizer.name']} (the config's defaults)"
    return ("the config's amos_style (Adam direction, learning rate 0.01, inverse-square decay "
            "with half-life steps/2)")


def _overrides(preset: str, steps: int, seed: int, alpha: float) -> dict[str, Any]:
    _, overrides, _ = PRESETS[preset]
    every = max(steps // EVALS, 1)
    return {
        **overrides,
        "objective.rdrop_alpha": alpha,
        **run_schedule(seed, steps, log_points=10, eval_every=every,
                       checkpoint_every=steps if steps % every == 0 else every * EVALS),
        # The config's Amos-style decay (half-life 1500 of 3000 steps), at this length.
        "optimizer.amos_style.half_life": max(steps // 2, 1),
    }


def _curves(workdir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """`(step → dev F1, step → mean train gp_kl)` read from the run's `metrics.jsonl`."""
    f1, kl = {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "eval" and "f1" in row:
            f1[str(row["step"])] = float(row["f1"])
        if row.get("split") == "train" and "gp_kl" in row:
            kl[str(row["step"])] = float(row["gp_kl"])
    return f1, kl


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 4: trains GlobalPointer with α = 0 and α = 4 for each seed."""
    print(f"[reproduce] rdrop, preset {args.preset}", flush=True)
    config_preset, preset_overrides, default_steps = PRESETS[args.preset]
    steps = args.steps or default_steps
    seeds = list(args.seeds)
    runs_root = Path(args.runs) / "rdrop" / f"{args.preset}-{steps}steps"
    started = time.perf_counter()
    variants: dict[str, Any] = {}
    for name, alpha in RDROP_VARIANTS:
        per_seed, curves, kl_curves, commands, seconds, reused = {}, {}, {}, {}, {}, []
        for seed in seeds:
            overrides = _overrides(args.preset, steps, seed, alpha)
            workdir = runs_root / f"alpha{alpha:g}-seed{seed}"
            final, seconds[str(seed)] = timed_train_run(
                f"{name}, seed {seed}", GP_CONFIG, config_preset, overrides, workdir)
            if final.get("reused"):
                reused.append(seed)
            metrics = final["eval"]
            per_seed[str(seed)] = {key: float(metrics[key])
                                   for key in ("f1", "precision", "recall")}
            curves[str(seed)], kl_curves[str(seed)] = _curves(workdir)
            commands[str(seed)] = train_command(GP_CONFIG, workdir, config_preset, overrides)
            print(f"[reproduce]   dev F1 {100 * per_seed[str(seed)]['f1']:.2f}  "
                  f"({seconds[str(seed)]:.0f} s)", flush=True)
        result: dict[str, Any] = {"rdrop_alpha": alpha, "scores": per_seed,
                                  "f1_curve": curves, "train_gp_kl": kl_curves,
                                  "run_seconds": seconds, "reused_seeds": reused,
                                  "train_commands": commands}
        for key in ("f1", "precision", "recall"):
            result[f"{key}_mean"], result[f"{key}_std"] = summary(
                [scores[key] for scores in per_seed.values()])
        variants[name] = result
    return {
        "study": "rdrop",
        "title": "R-Drop with the GlobalPointer symmetric KL on CLUENER (span F1)",
        "spec": "kexue.fm archives 8496, 9039",
        "config": GP_CONFIG, "preset": args.preset, "config_preset": config_preset,
        "model_and_data": preset_overrides, "steps": steps, "seeds": seeds,
        "optimizer": _optimizer_text(preset_overrides),
        "metric": "dev span F1", "variants": variants,
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def _table(record: Mapping[str, Any]) -> str:
    steps = sorted({int(s) for v in record["variants"].values()
                    for curve in v["f1_curve"].values() for s in curve})
    lines = ["| objective | " + " | ".join(f"F1 @ {s}" for s in steps)
             + " | precision | recall | s / run |",
             "|---|" + "---|" * (len(steps) + 3)]
    for name, v in record["variants"].items():
        at = []
        for step in steps:
            values = [c[str(step)] for c in v["f1_curve"].values() if str(step) in c]
            at.append(cell(*summary(values)) if values else "–")
        trained = [t for seed, t in v["run_seconds"].items()
                   if int(seed) not in v.get("reused_seeds", ())]
        run_s = f"{np.mean(trained):.0f}" if trained else "–"
        lines.append(f"| {name} | " + " | ".join(at)
                     + f" | {cell(v['precision_mean'], v['precision_std'])} | "
                     f"{cell(v['recall_mean'], v['recall_std'])} | {run_s} |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (name, v), color in zip(record["variants"].items(), ("tab:blue", "tab:red"),
                                strict=False):
        steps = sorted({int(s) for curve in v["f1_curve"].values() for s in curve})
        for curve in v["f1_curve"].values():
            ax.plot([int(s) for s in curve], [100 * f for f in curve.values()], color=color,
                    alpha=0.25, linewidth=1)
        mean = [100 * np.mean([c[str(s)] for c in v["f1_curve"].values() if str(s) in c])
                for s in steps]
        ax.plot(steps, mean, color=color, marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("dev span F1 (%)")
    ax.set_title(f"GlobalPointer on CLUENER, {seeds_label(record['seeds'])} "
                 "(thin: runs, thick: mean)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    spread = spread_text(record["seeds"])
    model = overrides_text(record["model_and_data"])
    return "\n".join([
        *header_lines(record),
        f"- `{record['config']}` (preset `{record['preset']}`: {model}), {record['steps']} "
        f"steps, optimizer {record['optimizer']}; R-Drop loss `½(L₁ + L₂) + (α/4)·D(s, t)` "
        "with the GlobalPointer divergence (`objective.rdrop_alpha`); dev span F1 (%) over "
        + ("the first 32 dev sentences (smoke preset)" if record["preset"] == "smoke"
           else "all 1343 dev sentences") + f"; {spread}. An R-Drop step runs the model "
        "twice (s / run: wall seconds per run trained in this invocation, on this shared "
        "machine).",
        "",
        _table(record),
        "",
        f"![dev F1 vs steps]({png_name})",
        "",
    ])
