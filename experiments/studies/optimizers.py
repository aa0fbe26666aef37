"""Study 5: Amos and the Amos-style Adam chain against AdamW.

ArXiv 2210.11693 (Amos) and kexue.fm/archives/9344 (Amos-style schedules).

Two tasks: the byte-level causal LM on the Python standard library
(`configs/lm_stdlib.py`, eval loss in nats per byte on held-out files) and GlobalPointer
NER on CLUENER (`configs/cluener_globalpointer.py`, eval loss the dense ZLPR loss over
the whole dev set, plus span F1). Each is trained with `optimizer.name` ∈ {adamw,
amos, amos_style} at the settings of `configs/common.py:optimizer_config` and the
config file (learning rates as given there; the Amos-style half-life is the config's
share of the run, as the run is shortened). Measured per run from `metrics.jsonl`:
the train loss curve (logged every 1/20 of the run, each record the mean over its
interval) and the eval loss at 4 points; then, per optimizer, the step at which the
curve first reaches AdamW's final loss (mean over seeds; linear interpolation between
logged points, "not reached" if it never does). Optimizer memory: the bytes of the
optimizer state for the model (`jax.eval_shape` of `tx.init`, summed over the leaves),
also for `amos_factored` (Amos with factored second moments, not trained here).
Amos: arXiv 2210.11693; Amos-style schedules: kexue.fm archive 9344.
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
    flag_value,
    run_schedule,
    save_figure,
    seeds_label,
    spread_text,
    summary,
    timed_train_run,
    train_command,
)

#: task -> (config file, share of the config's run that is the Amos-style half-life)
TASKS: dict[str, tuple[str, float]] = {
    "lm": ("configs/lm_stdlib.py", 1000 / 400),           # default half-life 1000, 400 steps
    "ner": ("configs/cluener_globalpointer.py", 1500 / 3000),  # half_life=1500 of 3000
}
TASK_NAMES = {"lm": "byte LM (stdlib), nats/byte", "ner": "GlobalPointer NER (CLUENER)"}
TRAINED = ("adamw", "amos", "amos_style")
MEMORY_ONLY = ("amos_factored",)
OPTIMIZER_NAMES = {"adamw": "AdamW", "amos": "Amos", "amos_style": "Amos-style Adam",
                   "amos_factored": "Amos (factored v)"}
COLORS = {"adamw": "tab:blue", "amos": "tab:red", "amos_style": "tab:green"}
EVAL_POINTS = 4
_SMALL = {"model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
          "model.mlp_dim": 512, "train.tensorboard": False}
#: Study presets: task -> (the config file's preset, overrides), the default steps and
#: the optimizers trained (the smoke preset trains two, to stay fast).
PRESETS: dict[str, tuple[dict[str, tuple[str, dict[str, Any]]], int, tuple[str, ...]]] = {
    "default": ({
        "lm": ("full", {**_SMALL, "data.batch_size": 16, "data.seq_len": 128}),
        "ner": ("full", {**_SMALL, "model.gp_head_dim": 32, "data.batch_size": 32}),
    }, 300, TRAINED),
    "smoke": ({
        "lm": ("smoke", {"model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
                         "model.mlp_dim": 32, "train.tensorboard": False}),
        "ner": ("smoke", {"model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
                          "model.mlp_dim": 32, "model.gp_head_dim": 8,
                          "train.tensorboard": False}),
    }, 2, ("adamw", "amos")),
}


def _overrides(preset: str, task: str, steps: int, seed: int,
               optimizer: str) -> dict[str, Any]:
    _, overrides = PRESETS[preset][0][task]
    eval_every = max(steps // EVAL_POINTS, 1)
    return {
        **overrides,
        "optimizer.name": optimizer,
        **run_schedule(seed, steps, log_points=20, eval_every=eval_every,
                       checkpoint_every=steps if steps % eval_every == 0 else eval_every),
        "optimizer.amos_style.half_life": max(round(TASKS[task][1] * steps), 1),
    }


def optimizer_memory(config_file: str, preset: str,
                     overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes of the model's parameters and of `tx.init(params)` (shapes only), and settings."""
    import jax

    from experiments import run as experiment_run
    from experiments.studies.common import study_config
    from kexue import models

    run = experiment_run.build(study_config(config_file, preset, overrides))
    params = models.initial_params(run.model_factory)
    state = jax.eval_shape(run.tx.init, params)

    def nbytes(tree: Any) -> int:
        return int(sum(np.prod(leaf.shape, dtype=np.int64) * np.dtype(leaf.dtype).itemsize
                       for leaf in jax.tree.leaves(tree)))

    name = run.config.optimizer.name
    section = run.config.optimizer["amos" if name == "amos_factored" else name].to_dict()
    return {"param_bytes": nbytes(params), "state_bytes": nbytes(state),
            "settings": section}


def read_curves(workdir: Path) -> dict[str, list[list[float]]]:
    """`{"train": [[step, loss], ...], "eval": [...]}` from `<workdir>/metrics.jsonl`."""
    curves: dict[str, list[list[float]]] = {"train": [], "eval": []}
    with open(workdir / "metrics.jsonl", encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            if record.get("split") in curves and "loss" in record:
                curves[record["split"]].append([int(record["step"]), float(record["loss"])])
    return curves


def steps_to_reach(points: Sequence[Sequence[float]], target: float) -> float | None:
    """First step where the curve `[[step, loss], ...]` is <= `target` (linear between
    logged points; the first point itself if it is already there); None if never."""
    previous = None
    for step, value in points:
        if value <= target:
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0) = previous
            return float(s0 + (step - s0) * (v0 - target) / (v0 - value))
        previous = (step, value)
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 5: trains task × optimizer × seeds; returns the results record."""
    tasks, default_steps, trained = PRESETS[args.preset]
    steps = args.steps or default_steps
    runs_root = Path(args.runs) / "optimizers" / f"{args.preset}-{steps}steps"
    started = time.perf_counter()
    memory = {task: {opt: optimizer_memory(config_file, tasks[task][0],
                                           _overrides(args.preset, task, steps, 0, opt))
                     for opt in (*trained, *MEMORY_ONLY)}
              for task, (config_file, _) in TASKS.items()}
    entries = {task: {opt: {"scores": {}, "run_seconds": {}, "reused_seeds": [],
                            "train_commands": {}} for opt in trained} for task in TASKS}
    for seed in args.seeds:  # seeds outermost: an interrupted study has whole seeds
        for task, (config_file, _) in TASKS.items():
            config_preset, _ = tasks[task]
            for opt in trained:
                entry = entries[task][opt]
                overrides = _overrides(args.preset, task, steps, seed, opt)
                workdir = runs_root / f"{task}-{opt}-seed{seed}"
                final, entry["run_seconds"][str(seed)] = timed_train_run(
                    f"{task}, {opt}, seed {seed}", config_file, config_preset, overrides, workdir)
                if final.get("reused"):
                    entry["reused_seeds"].append(seed)
                curves = read_curves(workdir)
                scores = entry["scores"][str(seed)] = {
                    "curves": curves, "final_train_loss": curves["train"][-1][1],
                    "final_eval_loss": float(final["eval"]["loss"]),
                    **({"final_f1": float(final["eval"]["f1"])} if task == "ner" else {}),
                }
                entry["train_commands"][str(seed)] = train_command(
                    config_file, workdir, config_preset, overrides)
                print(f"[reproduce]   train loss {scores['final_train_loss']:.4f}"
                      f"  eval loss {scores['final_eval_loss']:.4f}"
                      f"  ({entry['run_seconds'][str(seed)]:.0f} s)", flush=True)
    results: dict[str, Any] = {}
    for task, (config_file, _) in TASKS.items():
        config_preset, preset_overrides = tasks[task]
        _summarise(entries[task], memory[task])
        results[task] = {"config": config_file, "config_preset": config_preset,
                         "model_and_data": preset_overrides, "optimizers": entries[task],
                         "memory": memory[task]}
    return {
        "study": "optimizers",
        "title": "Amos and Amos-style Adam vs AdamW: loss against steps, optimizer memory",
        "spec": "arXiv 2210.11693; kexue.fm archive 9344",
        "preset": args.preset, "steps": steps, "seeds": list(args.seeds),
        "trained": list(trained), "memory_only": list(MEMORY_ONLY), "tasks": results,
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def _summarise(optimizers: dict[str, Any], memory: Mapping[str, Any]) -> None:
    """Means over seeds and the steps to reach AdamW's final (mean) losses, in place."""
    baseline = optimizers["adamw"]["scores"].values()
    targets = {split: float(np.mean([s[f"final_{split}_loss"] for s in baseline]))
               for split in ("train", "eval")}
    for opt, entry in optimizers.items():
        scores = entry["scores"]
        for key in ("final_train_loss", "final_eval_loss", "final_f1"):
            values = [s[key] for s in scores.values() if key in s]
            if values:
                entry[key] = dict(zip(("mean", "std"), summary(values), strict=True))
        for split in ("train", "eval"):
            reached = [steps_to_reach(s["curves"][split], targets[split])
                       for s in scores.values()]
            entry[f"steps_to_adamw_{split}"] = {
                "target": targets[split], "per_seed": reached,
                "mean_of_reached": (float(np.mean([r for r in reached if r is not None]))
                                    if any(r is not None for r in reached) else None),
                "reached": sum(r is not None for r in reached), "seeds": len(reached)}
        entry["state_bytes"] = memory[opt]["state_bytes"]
    for values in memory.values():
        values["relative_to_adamw"] = values["state_bytes"] / memory["adamw"]["state_bytes"]


def _settings_text(opt: str, settings: Mapping[str, Any]) -> str:
    keys = {"adamw": ("learning_rate", "schedule", "warmup_steps", "b2", "weight_decay"),
            "amos": ("learning_rate", "beta", "momentum"),
            "amos_factored": ("learning_rate", "beta", "momentum"),
            "amos_style": ("learning_rate", "half_life", "kind", "b2")}[opt]
    names = {"learning_rate": "ξ" if opt.startswith("amos") and opt != "amos_style"
             else ("α₀" if opt == "amos_style" else "lr"), "weight_decay": "wd",
             "warmup_steps": "warmup"}
    return ", ".join(f"{names.get(k, k)} {flag_value(settings[k])}" for k in keys
                     if k in settings)


def _steps_cell(entry: Mapping[str, Any], split: str, steps: int) -> str:
    info = entry[f"steps_to_adamw_{split}"]
    if not info["reached"]:
        return "not reached"
    text = f"{info['mean_of_reached']:.0f}"
    if info["reached"] < info["seeds"]:
        text += f" ({info['reached']} of {info['seeds']} seeds)"
    return text


def _loss_cell(stat: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if stat is None:
        return "–"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + ("" if stat["std"] is None else f" ± {scale * stat['std']:.{digits}f}")


def _table(record: Mapping[str, Any], task: str) -> str:
    result = record["tasks"][task]
    steps = record["steps"]
    ner = task == "ner"
    head = ("| optimizer | settings | final train loss | final eval loss | "
            + ("dev span F1 (%) | " if ner else "")
            + "steps to AdamW's eval loss | steps to AdamW's train loss | "
            "optimizer state (KiB) | × AdamW |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    memory = result["memory"]
    for opt in (*record["trained"], *record["memory_only"]):
        settings = _settings_text(opt, memory[opt]["settings"])
        kib = f"{memory[opt]['state_bytes'] / 1024:.0f}"
        relative = f"{memory[opt]['relative_to_adamw']:.2f}"
        entry = result["optimizers"].get(opt)
        if entry is None:
            cells = ["not trained"] + ["–"] * (3 + ner)
        else:
            cells = [_loss_cell(entry["final_train_loss"]), _loss_cell(entry["final_eval_loss"])]
            if ner:
                cells.append(_loss_cell(entry.get("final_f1"), 100, 2))
            cells += [_steps_cell(entry, "eval", steps), _steps_cell(entry, "train", steps)]
        lines.append(f"| {OPTIMIZER_NAMES[opt]} | {settings} | " + " | ".join(cells)
                     + f" | {kib} | {relative} |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(record["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.0 * len(tasks), 4.2), dpi=120)
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        for opt, entry in record["tasks"][task]["optimizers"].items():
            color = COLORS[opt]
            for split, style in (("train", "-"), ("eval", "o--")):
                curves = [np.asarray(s["curves"][split]) for s in entry["scores"].values()]
                length = min(len(c) for c in curves)
                if not length:
                    continue
                steps = curves[0][:length, 0]
                values = np.stack([c[:length, 1] for c in curves])
                label = f"{OPTIMIZER_NAMES[opt]} ({split})"
                ax.plot(steps, values.mean(0), style, color=color, label=label,
                        markersize=4, linewidth=1.5 if split == "train" else 1.0)
                if len(curves) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), color=color,
                                    alpha=0.15 if split == "train" else 0.08)
        ax.set_title(TASK_NAMES[task], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{record['steps']} steps, {seeds_label(record['seeds'])}: mean"
                 + (", shaded min–max over seeds" if len(record["seeds"]) > 1 else ""),
                 fontsize=9)
    save_figure(fig, path)


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    seeds = record["seeds"]
    runs = [o for t in record["tasks"].values() for o in t["optimizers"].values()]
    reused = sum(len(o.get("reused_seeds", ())) for o in runs)
    runtime = f"total {record['runtime_s'] / 60:.1f} min" + (
        f"; {reused} of {len(runs) * len(seeds)} runs read back from an earlier invocation"
        if reused else "")
    spread = spread_text(seeds)
    lines = [
        f"# {record['title']}",
        "",
        f"- Date: {record['date']}; machine: {record['machine']}",
        f"- Command: `{record['command']}` ({runtime})",
        f"- {record['steps']} steps per run, eval every {max(record['steps'] // EVAL_POINTS, 1)}"
        f" steps; {spread}. Losses: train = mean over the last logged interval "
        f"({max(record['steps'] // 20, 1)} steps), eval = the whole eval set. \"Steps to "
        "AdamW's loss\": first step at which the logged curve reaches AdamW's final loss "
        "(mean over seeds), interpolated linearly between logged points; mean over the "
        "seeds that reach it. Optimizer state: bytes of `tx.init(params)` (float32).",
    ]
    for task, result in record["tasks"].items():
        model = ", ".join(f"`{k}={flag_value(v)}`" for k, v in result["model_and_data"].items())
        params = result["memory"]["adamw"]["param_bytes"]
        lines += ["", f"**{TASK_NAMES[task]}**: `{result['config']}` (preset "
                      f"`{record['preset']}`: {model}); parameters {params / 1024:.0f} KiB.",
                  "", _table(record, task)]
    lines += ["", f"![loss against steps]({png_name})", ""]
    return "\n".join(lines)
