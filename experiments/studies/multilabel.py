"""Study 3: ZLPR vs sigmoid BCE for multi-label classification, balanced and imbalanced.

Which of the 10 CLUENER entity types occur in a sentence (`configs/cluener_multilabel.py`),
trained with `objective.loss` ∈ {zlpr, sigmoid_bce} (kexue.fm archive 7359).
The class imbalance is controlled with the data options `data.rare_types` and
`data.type_keep_fraction = r`: of the training sentences holding any of the five
rarest types (`RARE_TYPES`), only the fraction r is kept (chosen by `data.seed`), so
at r = 0.1 those types occur in about a tenth as many training sentences; the dev set
is never filtered. Reported on the whole dev set (`final_metrics.json`): micro F1,
macro F1, per-class F1 (`eval/f1_<type>`) and their means over the rare and the other
types. Both losses decide at score 0, so no threshold is tuned.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.studies.common import (
    cell,
    overrides_text,
    run_schedule,
    runtime_text,
    save_figure,
    seeds_label,
    spread_text,
    summary,
    timed_train_run,
    train_command,
)

ML_CONFIG = "configs/cluener_multilabel.py"
LOSSES = ("zlpr", "sigmoid_bce")
LOSS_NAMES = {"zlpr": "ZLPR", "sigmoid_bce": "sigmoid BCE"}
#: The five types found in the fewest CLUENER training sentences (movie 779, book 908,
#: scene 946, government 1461, organization 1894 of 10748).
RARE_TYPES = ("movie", "book", "scene", "government", "organization")
TYPES = ("address", "book", "company", "game", "government",
         "movie", "name", "organization", "position", "scene")
#: Study presets: (the config file's preset, overrides, default steps, keep fractions).
#: The config's optimizer (Amos-style Adam, α₀ = 0.01, half-life half the run) is kept.
PRESETS: dict[str, tuple[str, dict[str, Any], int, tuple[float, ...]]] = {
    "default": ("full", {
        "model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
        "model.mlp_dim": 512, "data.batch_size": 32, "train.tensorboard": False,
    }, 400, (1.0, 0.1)),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "train.tensorboard": False,
    }, 2, (1.0, 0.5)),
}


def _overrides(preset: str, steps: int, seed: int, loss: str,
               keep: float) -> dict[str, Any]:
    _, overrides, _, _ = PRESETS[preset]
    imbalance = ({"data.rare_types": ",".join(RARE_TYPES), "data.type_keep_fraction": keep}
                 if keep < 1.0 else {})
    return {
        **overrides,
        **imbalance,
        "objective.loss": loss,
        **run_schedule(seed, steps, log_points=20),
        # The config's schedule shape: half-life 1500 of 3000 steps.
        "optimizer.amos_style.half_life": max(round(0.5 * steps), 1),
    }


def _train_type_counts(preset: str, overrides: Mapping[str, Any]) -> dict[str, int]:
    """Training sentences per type (and in all) after the imbalance filter."""
    from experiments.studies.common import study_config
    from kexue.data import DataConfig, make_builder, prepare
    from kexue.data.pipeline import _imbalanced_indices, _rare_type_names

    s = DataConfig.from_settings(study_config(ML_CONFIG, preset, overrides).data)
    builder = make_builder(s.name, s.data_dir, skip_bad_records=s.skip_bad_records)
    prepare(builder, manual_dir=s.manual_dir, download=s.download)
    source = builder.as_data_source(split=s.train_split)
    count = min(len(source), s.max_examples) if s.max_examples else len(source)
    indices = (_imbalanced_indices(source, count, s, TYPES)
               if _rare_type_names(s.rare_types) else range(count))
    counts = dict.fromkeys(TYPES, 0)
    for i in indices:
        for t in set(np.asarray(source[i]["span_type"]).tolist()):
            counts[TYPES[t]] += 1
    return {"sentences": len(indices), **counts}


#: Summary metrics of a run, as in the table (rare / other: mean per-class F1).
METRICS = ("micro_f1", "macro_f1", "rare_f1", "frequent_f1")
METRIC_NAMES = {"micro_f1": "micro F1", "macro_f1": "macro F1",
                "rare_f1": "rare-type F1 (mean of 5)", "frequent_f1": "other-type F1 (mean of 5)"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 3: trains loss × keep fraction × seeds; returns the results record."""
    config_preset, preset_overrides, default_steps, keeps = PRESETS[args.preset]
    steps = args.steps or default_steps
    runs_root = Path(args.runs) / "multilabel" / f"{args.preset}-{steps}steps"
    train_counts: dict[str, Any] = {str(keep): {} for keep in keeps}
    cells = [(keep, loss) for keep in keeps for loss in LOSSES]
    per_seed: dict[tuple, dict[str, Any]] = {c: {} for c in cells}
    commands: dict[tuple, dict[str, str]] = {c: {} for c in cells}
    seconds: dict[tuple, dict[str, float]] = {c: {} for c in cells}
    reused: dict[tuple, list[int]] = {c: [] for c in cells}
    started = time.perf_counter()
    for seed in args.seeds:  # seeds outermost: an interrupted study has whole seeds
        for keep in keeps:
            train_counts[str(keep)][str(seed)] = _train_type_counts(
                config_preset, _overrides(args.preset, steps, seed, "zlpr", keep))
        for keep, loss in cells:
            c = (keep, loss)
            overrides = _overrides(args.preset, steps, seed, loss, keep)
            workdir = runs_root / f"{loss}-keep{keep:g}-seed{seed}"
            final, seconds[c][str(seed)] = timed_train_run(
                f"{LOSS_NAMES[loss]}, r = {keep:g}, seed {seed}", ML_CONFIG, config_preset,
                overrides, workdir)
            if final.get("reused"):
                reused[c].append(seed)
            evaluated = final["eval"]
            per_class = {t: float(evaluated[f"f1_{t}"]) for t in TYPES}
            scores = per_seed[c][str(seed)] = {
                "micro_f1": float(evaluated["micro_f1"]),
                "macro_f1": float(evaluated["macro_f1"]),
                "rare_f1": float(np.mean([per_class[t] for t in RARE_TYPES])),
                "frequent_f1": float(np.mean([per_class[t] for t in TYPES
                                              if t not in RARE_TYPES])),
                "per_class_f1": per_class,
                "eval_loss": float(evaluated["loss"]),
            }
            commands[c][str(seed)] = train_command(ML_CONFIG, workdir, config_preset,
                                                   overrides)
            print("[reproduce]   " + "  ".join(f"{k} {100 * scores[k]:.2f}" for k in METRICS)
                  + f"  ({seconds[c][str(seed)]:.0f} s)", flush=True)
    variants: dict[str, Any] = {}
    for keep, loss in cells:
        c = (keep, loss)
        mean, spread = {}, {}
        for key in METRICS:
            mean[key], spread[key] = summary([r[key] for r in per_seed[c].values()])
        for t in TYPES:
            mean[f"f1_{t}"], spread[f"f1_{t}"] = summary(
                [r["per_class_f1"][t] for r in per_seed[c].values()])
        variants[f"{LOSS_NAMES[loss]}, r = {keep:g}"] = {
            "loss": loss, "keep_fraction": keep, "scores": per_seed[c], "mean": mean,
            "std": spread, "run_seconds": seconds[c], "reused_seeds": reused[c],
            "train_commands": commands[c]}
    return {
        "study": "multilabel",
        "title": "ZLPR vs sigmoid BCE on CLUENER multi-label, balanced and imbalanced",
        "spec": "kexue.fm archive 7359",
        "config": ML_CONFIG, "preset": args.preset, "config_preset": config_preset,
        "model_and_data": preset_overrides, "steps": steps, "seeds": list(args.seeds),
        "rare_types": list(RARE_TYPES), "keep_fractions": list(keeps),
        "train_type_counts": train_counts, "metrics": list(METRICS),
        "variants": variants, "runtime_s": round(time.perf_counter() - started, 1),
    }


def _table(record: Mapping[str, Any]) -> str:
    metrics = record["metrics"]
    lines = ["| loss | r | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for variant in record["variants"].values():
        cells = [cell(variant["mean"][m], variant["std"][m]) for m in metrics]
        lines.append(f"| {LOSS_NAMES[variant['loss']]} | {variant['keep_fraction']:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rare_table(record: Mapping[str, Any]) -> str:
    rare = record["rare_types"]
    lines = ["| loss | r | " + " | ".join(rare) + " |", "|---|---|" + "---|" * len(rare)]
    for variant in record["variants"].values():
        cells = [cell(variant["mean"][f"f1_{t}"], variant["std"][f"f1_{t}"]) for t in rare]
        lines.append(f"| {LOSS_NAMES[variant['loss']]} | {variant['keep_fraction']:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _counts_line(record: Mapping[str, Any]) -> str:
    seed = str(record["seeds"][0])
    parts = []
    for keep in record["keep_fractions"]:
        counts = record["train_type_counts"][str(keep)][seed]
        rare = ", ".join(f"{t} {counts[t]}" for t in record["rare_types"])
        parts.append(f"r = {keep:g}: {counts['sentences']} sentences ({rare})")
    return "; ".join(parts)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = record["metrics"]
    variants = list(record["variants"].items())
    colors = {"zlpr": ("tab:red", "mistyrose"), "sigmoid_bce": ("tab:blue", "lightsteelblue")}
    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=120)
    width = 0.8 / len(variants)
    x = np.arange(len(metrics))
    for index, (name, variant) in enumerate(variants):
        dark, light = colors[variant["loss"]]
        balanced = variant["keep_fraction"] >= 1.0
        mean = np.array([100 * variant["mean"][m] for m in metrics])
        std = np.array([100 * (variant["std"][m] or 0.0) for m in metrics])
        ax.bar(x + (index - (len(variants) - 1) / 2) * width, mean, width,
               yerr=std if std.any() else None, capsize=3, label=name,
               color=dark if balanced else light, edgecolor=dark,
               hatch=None if balanced else "//")
    ax.set_xticks(x, [METRIC_NAMES[m].replace(" (mean of 5)", "\n(mean of 5)")
                      for m in metrics])
    ax.set_ylabel("dev F1 (%)")
    ax.set_title(f"CLUENER type multi-label, {record['steps']} steps, "
                 f"{seeds_label(record['seeds'], ' (mean ± std)')}"
                 "; r: share of rare-type sentences kept", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    seeds = record["seeds"]
    reused = sum(len(v.get("reused_seeds", ())) for v in record["variants"].values())
    total = len(seeds) * len(record["variants"])
    runtime = runtime_text(record["runtime_s"], reused, total)
    spread = spread_text(seeds)
    model = overrides_text(record["model_and_data"])
    return "\n".join([
        f"# {record['title']}",
        "",
        f"- Date: {record['date']}; machine: {record['machine']}",
        f"- Command: `{record['command']}` ({runtime})",
        f"- `{record['config']}` (preset `{record['preset']}`: {model}), "
        f"{record['steps']} steps, the config's Amos-style Adam (α₀ = 0.01, half-life "
        f"{max(round(0.5 * record['steps']), 1)} steps); F1 (%) over the whole dev set, "
        "deciding at score 0; " + spread + ".",
        f"- Imbalance: `data.rare_types={','.join(record['rare_types'])}` and "
        "`data.type_keep_fraction=r` keep a share r of the training sentences that hold "
        f"any of these types (the dev set is untouched). Training sentences (seed "
        f"{seeds[0]}): {_counts_line(record)}.",
        "",
        _table(record),
        "",
        "Per-class F1 (%) of the rare types:",
        "",
        _rare_table(record),
        "",
        f"![F1 by loss and imbalance]({png_name})",
        "",
    ])
