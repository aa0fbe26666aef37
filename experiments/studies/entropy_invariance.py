"""Study 1: entropy-invariant attention and length extrapolation (kexue.fm/archives/8823, 9444).

RoFormer MLM trained at length 64 on the byte-level stdlib corpus
(`configs/mlm_extrapolation.py`) for the four variants attention scale ∈ {standard,
entropy_invariant} × training positions ∈ {contiguous, random_equal_mean}, one run per
seed; masked-token accuracy at evaluation lengths 64 … 1024 (64 … 4096 with the `gpu`
preset; `final_metrics.json`, `eval/accuracy_<L>`). kexue.fm archives 8823 and 9444.

Second table: the mechanism the post argues from. For each trained model, the entropy
of every attention layer's distributions (`kexue.models.attention_entropies`) on the
held-out batches of each evaluation length, against `log n` (uniform over the `n`
visible keys): with the standard scale it should grow with `n`, with the
entropy-invariant one stay near its value at the training length.
"""

from __future__ import annotations

import argparse
import json
import math
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

MLM_CONFIG = "configs/mlm_extrapolation.py"
LENGTHS = (64, 128, 256, 512, 1024)
#: Evaluation lengths of the presets that go further than `LENGTHS`.
PRESET_LENGTHS = {"gpu": (64, 128, 256, 512, 1024, 2048, 4096),
                  "smoke": (64, 128)}  # each length compiles its own programs
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
#: "cpu_large" is the config file's own model (width 256 × 4 layers) at what about an
#: hour of 2 CPU cores allows for the four variants (one seed each: 1000 steps × 32 × 64
#: bytes = 2M training tokens per run).
#: "gpu" is the config file's own recipe (width 256 × 4 layers, batch 64 × 64 bytes,
#: 5000 steps = 20.5M training tokens per run, Amos-style with its half-life of 2000
#: steps) in bfloat16 compute, evaluated at 64 … 4096 (`PRESET_LENGTHS`): the GPU
#: campaign's study (`benchmarks/accelerator_studies.py`).
PRESETS: dict[str, tuple[str, dict[str, Any], int]] = {
    "default": ("full", {
        "model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
        "model.mlp_dim": 512, "data.batch_size": 32, "data.eval_batches": 4,
    }, 500),
    "gpu": ("full", {
        "model.width": 256, "model.num_layers": 4, "model.num_heads": 4,
        "model.mlp_dim": 1024, "model.dtype": "bfloat16", "data.batch_size": 64,
        "data.eval_batches": 4, "train.tensorboard": False,
    }, 5000),
    "cpu_large": ("full", {
        "model.width": 256, "model.num_layers": 4, "model.num_heads": 4,
        "model.mlp_dim": 1024, "data.batch_size": 32, "data.eval_batches": 4,
        "train.tensorboard": False,
    }, 1000),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "data.eval_batches": 1,
        "optimizer.name": "adamw", "train.tensorboard": False,
    }, 2),
}


def eval_lengths(preset: str) -> tuple[int, ...]:
    """The evaluation lengths of `preset` (`LENGTHS` unless `PRESET_LENGTHS` says)."""
    return PRESET_LENGTHS.get(preset, LENGTHS)


def _ei_overrides(preset: str, steps: int, seed: int, scale: str,
                  positions: str) -> dict[str, Any]:
    _, overrides, _ = PRESETS[preset]
    return {
        **overrides,
        "model.attention_scale": scale,
        "objective.positions": positions,
        "eval.lengths": eval_lengths(preset),
        **run_schedule(seed, steps, log_points=10),
        # The config's Amos-style decay (half-life 2000 of 5000 steps), at this length.
        "optimizer.amos_style.half_life": max(round(0.4 * steps), 1),
    }


#: Per-run cache of the attention-entropy measurement, keyed on the checkpoint's step.
ENTROPY_FILE = "attention_entropy.json"
#: Rows per forward pass of the measurement (the entropy is computed densely,
#: `[rows, heads, n, n]` per layer).
ENTROPY_ROWS = 8


def attention_entropy(config_preset: str, overrides: Mapping[str, Any],
                      workdir: Path) -> dict[str, list[float]]:
    """`{length: [entropy of layer 1, layer 2, …]}` (nats) of the model trained in `workdir`.

    Each value is the mean, over the real query positions, heads and held-out batches of
    that evaluation length (the batches the accuracy is measured on, masked inputs
    included), of the entropy of the query's attention distribution
    (`kexue.models.attention_entropies`). Kept in `<workdir>/attention_entropy.json`
    for the checkpoint's step; measured again when the run has moved on.
    """
    import jax.numpy as jnp
    from flax import nnx

    import kexue
    from experiments import run as experiment_run
    from experiments.studies.common import study_config
    from kexue import models

    trained = kexue.load(workdir)
    path = workdir / ENTROPY_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("step") == trained.step:
            return saved["entropy"]
    model = trained.model
    model.eval()
    run = experiment_run.build(study_config(MLM_CONFIG, config_preset, overrides))

    @nnx.jit
    def sums(model, tokens, valid):
        _, entropies = models.attention_entropies(model, tokens, valid=valid)
        weight = valid.astype(jnp.float32)
        per_layer = jnp.stack([jnp.sum(jnp.mean(e, axis=-1) * weight) for e in entropies])
        return per_layer, jnp.sum(weight)

    totals: dict[int, list[Any]] = {}
    for _, batch in run.eval_data():
        tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
        length = int(tokens.shape[1])
        for start in range(0, tokens.shape[0], ENTROPY_ROWS):
            rows = slice(start, start + ENTROPY_ROWS)
            layer_sums, count = sums(model, jnp.asarray(tokens[rows]), jnp.asarray(valid[rows]))
            total = totals.setdefault(length, [0.0, 0.0])
            total[0] = total[0] + np.asarray(layer_sums, np.float64)
            total[1] += float(count)
    entropy = {str(length): [float(x) for x in layer_sums / max(count, 1.0)]
               for length, (layer_sums, count) in sorted(totals.items())}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"step": trained.step, "entropy": entropy}, indent=1))
    temporary.replace(path)
    return entropy


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 1: trains the 4 variants × seeds; returns the results record."""
    config_preset, _, default_steps = PRESETS[args.preset]
    steps = args.steps or default_steps
    lengths = eval_lengths(args.preset)
    runs_root = Path(args.runs) / "entropy_invariance" / f"{args.preset}-{steps}steps"
    variants: dict[str, Any] = {}
    started = time.perf_counter()
    for name, scale, positions in EI_VARIANTS:
        per_seed: dict[str, dict[str, float]] = {}
        commands, seconds, reused, entropy = {}, {}, [], {}
        for seed in args.seeds:
            overrides = _ei_overrides(args.preset, steps, seed, scale, positions)
            workdir = runs_root / f"{scale}-{positions}-seed{seed}"
            final, seconds[str(seed)] = timed_train_run(
                f"{name}, seed {seed}", MLM_CONFIG, config_preset, overrides, workdir)
            if final.get("reused"):
                reused.append(seed)
            per_seed[str(seed)] = {str(n): float(final["eval"][f"accuracy_{n}"])
                                   for n in lengths}
            commands[str(seed)] = train_command(MLM_CONFIG, workdir, config_preset, overrides)
            entropy[str(seed)] = attention_entropy(config_preset, overrides, workdir)
            print("[reproduce]   accuracy " + "  ".join(
                f"{n}: {100 * per_seed[str(seed)][str(n)]:.2f}" for n in lengths)
                + f"  ({seconds[str(seed)]:.0f} s)", flush=True)
            print("[reproduce]   attention entropy (nats, layers 1…) " + "  ".join(
                f"{n}: " + "/".join(f"{h:.2f}" for h in entropy[str(seed)][str(n)])
                for n in lengths), flush=True)
        mean, spread = {}, {}
        for n in lengths:
            mean[str(n)], spread[str(n)] = summary([acc[str(n)] for acc in per_seed.values()])
        variants[name] = {"attention_scale": scale, "positions": positions,
                          "accuracy": per_seed, "mean": mean, "std": spread,
                          "attention_entropy": entropy,
                          "entropy_mean": {str(n): [float(np.mean(layer)) for layer in zip(
                              *(by_seed[str(n)] for by_seed in entropy.values()), strict=True)]
                              for n in lengths},
                          "run_seconds": seconds, "reused_seeds": reused,
                          "train_commands": commands}
    _, preset_overrides, _ = PRESETS[args.preset]
    return {
        "study": "entropy_invariance",
        "title": "Entropy-invariant attention and length extrapolation (MLM accuracy)",
        "spec": "kexue.fm archives 8823, 9444",
        "config": MLM_CONFIG, "preset": args.preset, "config_preset": config_preset,
        "model_and_data": preset_overrides, "steps": steps, "seeds": list(args.seeds),
        "train_length": 64, "lengths": list(lengths), "metric": "masked-token accuracy",
        "variants": variants, "runtime_s": round(time.perf_counter() - started, 1),
    }


def _ei_table(record: Mapping[str, Any]) -> str:
    lengths = record["lengths"]
    lines = ["| variant | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, variant in record["variants"].items():
        cells = [cell(variant["mean"][str(n)], variant["std"][str(n)]) for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _entropy_table(record: Mapping[str, Any]) -> str:
    lengths = record["lengths"]
    lines = ["| variant | layer | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths),
             "| uniform over the n visible keys (log n) | – | "
             + " | ".join(f"{math.log(n):.2f}" for n in lengths) + " |"]
    for name, variant in record["variants"].items():
        means = variant["entropy_mean"]
        for layer in range(len(means[str(lengths[0])])):
            cells = [f"{means[str(n)][layer]:.2f}" for n in lengths]
            lines.append(f"| {name} | {layer + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = record["lengths"]
    styles = {"standard": ("tab:blue", "-"), "entropy_invariant": ("tab:red", "-")}
    with_entropy = all("entropy_mean" in v for v in record["variants"].values())
    fig, axes = plt.subplots(1, 1 + with_entropy, figsize=(6.4 * (1 + with_entropy), 4.2),
                             dpi=120, squeeze=False)
    ax = axes[0, 0]
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
    ax.set_title(f"RoFormer MLM, {record['steps']} steps, "
                 f"{seeds_label(record['seeds'], ' (mean ± std)')}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if with_entropy:
        ax = axes[0, 1]
        for name, variant in record["variants"].items():
            color, _ = styles[variant["attention_scale"]]
            line = "--" if variant["positions"] == "random_equal_mean" else "-"
            mean = [float(np.mean(variant["entropy_mean"][str(n)])) for n in lengths]
            ax.plot(lengths, mean, color=color, linestyle=line, marker="o", markersize=4,
                    label=name)
        ax.plot(lengths, [math.log(n) for n in lengths], color="grey", linestyle=":",
                label="log n (uniform)")
        ax.axvline(record["train_length"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("evaluation length (tokens); trained at 64")
        ax.set_ylabel("attention entropy (nats), mean over layers")
        ax.set_title("attention entropy vs length", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    spread = spread_text(record["seeds"])
    model = overrides_text(record["model_and_data"])
    return "\n".join([
        *header_lines(record),
        f"- `{record['config']}` (preset `{record['preset']}`: {model}), "
        f"{record['steps']} steps at length {record['train_length']}, "
        f"MLM accuracy (%) on held-out stdlib files; {spread}.",
        "",
        _ei_table(record),
        "",
        *([] if not all("entropy_mean" in v for v in record["variants"].values()) else [
            "Attention entropy (nats) per layer and evaluation length: the entropy of "
            "each query's attention distribution, averaged over the real query "
            "positions, heads and held-out batches of that length; "
            + ("mean over seeds " + ", ".join(map(str, record["seeds"]))
               if len(record["seeds"]) > 1 else f"seed {record['seeds'][0]}") + ".",
            "",
            _entropy_table(record),
            "",
        ]),
        f"![accuracy vs evaluation length]({png_name})",
        "",
    ])
