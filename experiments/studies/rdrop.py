"""Study 4: R-Drop with the GlobalPointer symmetric KL on CLUENER (kexue.fm/archives/8496, 9039).

The GlobalPointer (RoPE) model of study 2 (`configs/cluener_globalpointer.py`, the
same small character-level encoder from scratch) trained with and without R-Drop
(kexue.fm/archives/8496): each step runs two forward passes with different dropout
masks and minimises `½ (L₁ + L₂) + (α / 4) · D(s, t)`, `L` the ZLPR loss and `D` the
GlobalPointer divergence `Σ (σ(s) − σ(t)) (s − t)` of archive 9039
(`objective.rdrop_alpha = α`; 0 = one pass, plain ZLPR), for every α and dropout rate
of the preset. Dev span F1 is evaluated several times during training
(`metrics.jsonl`) and reported at the best evaluation and its step (a regulariser
shows against over-fitting, which a last-step score can hide) and at the last step,
one run per seed. Two regimes: the full training set, and a small training subset
(`data.max_examples`, which trims the training split only; the dev set is whole),
where the model over-fits within the run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.studies.common import (
    best_evaluation,
    cell,
    eval_curve,
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
_SMALL = {"model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
          "model.mlp_dim": 512, "data.batch_size": 32}
#: The α grid of the longer presets: the post's 4, and smaller weights, since the
#: divergence is summed over every span of a sentence (n² / 2 Bernoulli pairs per type)
#: where the classification R-Drop of archive 8496 has one distribution per example,
#: and archive 9039 says the weight needs tuning.
ALPHAS = (0.0, 0.1, 0.3, 1.0, ALPHA)
#: Training sentences of the over-fitting regime (~13 epochs in 400 steps of 32).
SUBSET = 1000
#: Study presets: (the config file's preset, overrides, default steps, dev evaluations
#: per run, the R-Drop α values (0 = without), the dropout rates). "default" is the
#: encoder of study 2 (`experiments/studies/globalpointer.py`) on the full data;
#: "overfit" the same on the first 1000 training sentences; "gpu" and "gpu_overfit" the
#: full grid of both regimes, trained longer, for the GPU campaign.
PRESETS: dict[str, tuple[str, dict[str, Any], int, int, tuple[float, ...],
                         tuple[float, ...]]] = {
    "default": ("full", _SMALL, 400, 4, (0.0, ALPHA), (0.1,)),
    "overfit": ("full", {**_SMALL, "data.max_examples": SUBSET}, 400, 8, ALPHAS, (0.1, 0.3)),
    "gpu": ("full", _SMALL, 3000, 15, ALPHAS, (0.1, 0.3)),
    "gpu_overfit": ("full", {**_SMALL, "data.max_examples": SUBSET}, 1000, 10, ALPHAS,
                    (0.1, 0.3)),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "optimizer.name": "adamw",
        "train.tensorboard": False,
    }, 2, 2, (0.0, ALPHA), (0.1,)),
}


def variant_name(alpha: float, dropout: float) -> str:
    objective = "GlobalPointer" if alpha == 0 else f"GlobalPointer + R-Drop (α = {alpha:g})"
    return f"{objective}, dropout {dropout:g}"


def _optimizer_text(overrides: Mapping[str, Any]) -> str:
    if overrides.get("optimizer.name", "amos_style") != "amos_style":
        return f"{overrides['optimizer.name']} (the config's defaults)"
    return ("the config's amos_style (Adam direction, learning rate 0.01, inverse-square decay "
            "with half-life steps/2)")


def _overrides(preset: str, steps: int, seed: int, alpha: float,
               dropout: float) -> dict[str, Any]:
    _, overrides, _, evals, _, _ = PRESETS[preset]
    every = max(steps // evals, 1)
    return {
        **overrides,
        "model.dropout_rate": dropout,
        "objective.rdrop_alpha": alpha,
        **run_schedule(seed, steps, log_points=10, eval_every=every,
                       checkpoint_every=steps if steps % every == 0 else every * evals),
        # The config's Amos-style decay (half-life 1500 of 3000 steps), at this length.
        "optimizer.amos_style.half_life": max(steps // 2, 1),
    }


def _train_kl(workdir: Path) -> dict[str, float]:
    """`step → mean train gp_kl` read from the run's `metrics.jsonl`."""
    kl = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and "gp_kl" in row:
            kl[str(row["step"])] = float(row["gp_kl"])
    return kl


def _seed_scores(final: Mapping[str, Any], curve: Mapping[str, Mapping[str, float]]
                 ) -> dict[str, Any]:
    best_step, best = best_evaluation(curve)
    return {
        **{key: float(final["eval"][key]) for key in ("f1", "precision", "recall", "fp")},
        "best_step": best_step,
        **{f"best_{key}": best[key] for key in ("f1", "precision", "recall", "tp", "fp", "fn")},
    }


def _variant(runs_root: Path, name: str, alpha: float, dropout: float, preset: str,
             steps: int, seeds: Sequence[int]) -> dict[str, Any]:
    config_preset = PRESETS[preset][0]
    per_seed, curves, kl_curves, commands, seconds, reused = {}, {}, {}, {}, {}, []
    for seed in seeds:
        overrides = _overrides(preset, steps, seed, alpha, dropout)
        workdir = runs_root / f"alpha{alpha:g}-dropout{dropout:g}-seed{seed}"
        final, seconds[str(seed)] = timed_train_run(
            f"{name}, seed {seed}", GP_CONFIG, config_preset, overrides, workdir)
        if final.get("reused"):
            reused.append(seed)
        curve = eval_curve(workdir)
        scores = per_seed[str(seed)] = _seed_scores(final, curve)
        curves[str(seed)] = {step: values["f1"] for step, values in curve.items()}
        kl_curves[str(seed)] = _train_kl(workdir)
        commands[str(seed)] = train_command(GP_CONFIG, workdir, config_preset, overrides)
        print(f"[reproduce]   dev F1 best {100 * scores['best_f1']:.2f} at step "
              f"{scores['best_step']}, last {100 * scores['f1']:.2f}  "
              f"({seconds[str(seed)]:.0f} s)", flush=True)
    result: dict[str, Any] = {"rdrop_alpha": alpha, "dropout_rate": dropout,
                              "scores": per_seed, "f1_curve": curves, "train_gp_kl": kl_curves,
                              "run_seconds": seconds, "reused_seeds": reused,
                              "train_commands": commands}
    for key in ("f1", "precision", "recall", "best_f1", "best_precision", "best_recall",
                "best_fp", "best_step"):
        result[f"{key}_mean"], result[f"{key}_std"] = summary(
            [scores[key] for scores in per_seed.values()])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 4: trains GlobalPointer for every α × dropout of the preset and each seed."""
    print(f"[reproduce] rdrop, preset {args.preset}", flush=True)
    config_preset, preset_overrides, default_steps, evals, alphas, dropouts = \
        PRESETS[args.preset]
    steps = args.steps or default_steps
    seeds = list(args.seeds)
    runs_root = Path(args.runs) / "rdrop" / f"{args.preset}-{steps}steps"
    started = time.perf_counter()
    variants = {variant_name(alpha, dropout): _variant(runs_root, variant_name(alpha, dropout),
                                                       alpha, dropout, args.preset, steps,
                                                       seeds)
                for dropout in dropouts for alpha in alphas}
    return {
        "study": "rdrop",
        "title": "R-Drop with the GlobalPointer symmetric KL on CLUENER (span F1)",
        "spec": "kexue.fm archives 8496, 9039",
        "config": GP_CONFIG, "preset": args.preset, "config_preset": config_preset,
        "model_and_data": preset_overrides, "steps": steps, "seeds": seeds,
        "eval_every": max(steps // evals, 1), "alphas": list(alphas),
        "dropouts": list(dropouts),
        "optimizer": _optimizer_text(preset_overrides),
        "metric": "dev span F1", "variants": variants,
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def _table(record: Mapping[str, Any]) -> str:
    lines = ["| objective | dropout | α | best dev F1 | step of best | precision at best | "
             f"recall at best | false positives at best | F1 at step {record['steps']} | "
             "s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in record["variants"].items():
        trained = [t for seed, t in v["run_seconds"].items()
                   if int(seed) not in v.get("reused_seeds", ())]
        run_s = f"{np.mean(trained):.0f}" if trained else "–"
        steps = " / ".join(str(s["best_step"]) for s in v["scores"].values())
        objective = name.split(", dropout")[0]
        fp = f"{v['best_fp_mean']:.0f}" + ("" if v["best_fp_std"] is None
                                           else f" ± {v['best_fp_std']:.0f}")
        lines.append(f"| {objective} | {v['dropout_rate']:g} | {v['rdrop_alpha']:g} | "
                     f"{cell(v['best_f1_mean'], v['best_f1_std'])} | {steps} | "
                     f"{cell(v['best_precision_mean'], v['best_precision_std'])} | "
                     f"{cell(v['best_recall_mean'], v['best_recall_std'])} | {fp} | "
                     f"{cell(v['f1_mean'], v['f1_std'])} | {run_s} |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=120)
    colors = {0.0: "tab:blue", 1.0: "tab:orange", ALPHA: "tab:red"}
    styles = {dropout: style for dropout, style in zip(record["dropouts"], ("-", "--", ":"),
                                                        strict=False)}
    for name, v in record["variants"].items():
        color = colors.get(v["rdrop_alpha"], "tab:gray")
        style = styles.get(v["dropout_rate"], "-")
        steps = sorted({int(s) for curve in v["f1_curve"].values() for s in curve})
        for curve in v["f1_curve"].values():
            ax.plot([int(s) for s in curve], [100 * f for f in curve.values()], style,
                    color=color, alpha=0.2, linewidth=1)
        mean = [100 * np.mean([c[str(s)] for c in v["f1_curve"].values() if str(s) in c])
                for s in steps]
        ax.plot(steps, mean, style, color=color, marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("dev span F1 (%)")
    ax.set_title(f"GlobalPointer on CLUENER, {seeds_label(record['seeds'])} "
                 "(thin: runs, marked: mean)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _data_text(record: Mapping[str, Any]) -> str:
    if record["preset"] == "smoke":
        return "trained on the smoke config's first 32 training sentences"
    subset = record["model_and_data"].get("data.max_examples")
    return (f"trained on the first {subset} training sentences (the over-fitting regime; "
            f"{record['steps'] * record['model_and_data']['data.batch_size'] / subset:.1f} "
            "epochs)" if subset else "trained on the whole training set")


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    spread = spread_text(record["seeds"])
    model = overrides_text(record["model_and_data"])
    return "\n".join([
        *header_lines(record),
        f"- `{record['config']}` (preset `{record['preset']}`: {model}), {record['steps']} "
        f"steps, {_data_text(record)}, optimizer {record['optimizer']}; R-Drop loss "
        "`½(L₁ + L₂) + (α/4)·D(s, t)` with the GlobalPointer divergence "
        "(`objective.rdrop_alpha`); dev span F1 (%) over "
        + ("the first 32 dev sentences (smoke preset)" if record["preset"] == "smoke"
           else "all 1343 dev sentences")
        + f", evaluated every {record['eval_every']} steps; best: the evaluation with the "
        f"highest F1 (step of best: per seed); {spread}. An R-Drop step runs the model "
        "twice (s / run: wall seconds per run trained in this invocation, on this shared "
        "machine).",
        "",
        _table(record),
        "",
        f"![dev F1 vs steps]({png_name})",
        "",
    ])
