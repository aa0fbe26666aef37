"""Study 1, causal LM: bits/byte vs evaluation length, standard vs entropy-invariant scale.

A byte-level pre-norm RoPE decoder (`configs/lm_stdlib.py`, made small) trained at
length 64 on the stdlib corpus with attention scale `standard` (`1/√d`) or
`entropy_invariant` (`log_512(n_i)/√d`, n_i the keys query i sees; kexue.fm/archives/
8823), one run per seed, then scored at lengths 64 … 1024 (64 … 4096 with the `gpu`
preset; `eval.lengths` of the lm task): every length predicts the same held-out bytes
(windows of the longest length cut into shorter ones), over whole windows
(`bits_per_byte_<L>`) and over the tail, the last quarter of the positions of each
window (`bits_per_byte_tail_<L>`), where a model trained at 64 has to use contexts
longer than it ever saw. kexue.fm/archives/8823, 9444.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.studies.common import (
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

LM_CONFIG = "configs/lm_stdlib.py"
TRAIN_LENGTH = 64
LENGTHS = (64, 128, 256, 512, 1024)
#: Evaluation lengths of the presets that go further than `LENGTHS`.
PRESET_LENGTHS = {"gpu": (64, 128, 256, 512, 1024, 2048, 4096),
                  "long": (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)}
#: (name, model.attention_scale)
VARIANTS = (("standard", "standard"), ("entropy-invariant", "entropy_invariant"))
#: Study presets: (the config file's preset, overrides, default steps). The config
#: file's "full" model (width 256, 4 layers, length 128) is shrunk so that the 6 runs
#: of 600 steps take 13.9 CPU-minutes in all (37.6 min wall on the shared 2-core
#: development machine; about 10-15 min alone on two idle cores). "gpu" is the config
#: file's own model (width 256 × 4 layers, Amos) in bfloat16 compute, batch 64 × 64
#: bytes, 5000 steps (20.5M training tokens per run), evaluated at 64 … 4096
#: (`PRESET_LENGTHS`): the GPU campaign's study (`benchmarks/accelerator_studies.py`).
#: "long" trains the "default" model and evaluates it up to 16384 bytes on CPU (blocked
#: attention, the CPU default from 128 keys, keeps memory linear in the length); one
#: evaluation batch (32 windows of 16384 bytes, 524,288 scored bytes per length).
PRESETS: dict[str, tuple[str, dict[str, Any], int]] = {
    "default": ("full", {
        "model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
        "model.mlp_dim": 512, "data.batch_size": 32, "data.eval_batches": 4,
    }, 600),
    "gpu": ("full", {
        "model.width": 256, "model.num_layers": 4, "model.num_heads": 4,
        "model.mlp_dim": 1024, "model.dtype": "bfloat16", "data.batch_size": 64,
        "data.eval_batches": 4, "train.tensorboard": False,
    }, 5000),
    "long": ("full", {
        "model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
        "model.mlp_dim": 512, "data.batch_size": 32, "data.eval_batches": 1,
    }, 600),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "data.eval_batches": 1,
        "train.tensorboard": False,
    }, 2),
}


def eval_lengths(preset: str) -> tuple[int, ...]:
    """The evaluation lengths of `preset` (`LENGTHS` unless `PRESET_LENGTHS` says)."""
    return PRESET_LENGTHS.get(preset, LENGTHS)


def _overrides(preset: str, steps: int, seed: int, scale: str) -> dict[str, Any]:
    _, overrides, _ = PRESETS[preset]
    return {
        **overrides,
        "model.attention_scale": scale,
        "data.seq_len": TRAIN_LENGTH,
        "eval.lengths": eval_lengths(preset),
        "eval.sample_tokens": 0,
        **run_schedule(seed, steps, log_points=10),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Trains the 2 variants × seeds; returns the results record."""
    config_preset, preset_overrides, default_steps = PRESETS[args.preset]
    steps = args.steps or default_steps
    lengths = eval_lengths(args.preset)
    runs_root = Path(args.runs) / "lm_extrapolation" / f"{args.preset}-{steps}steps"
    variants: dict[str, Any] = {}
    tokens: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name, scale in VARIANTS:
        whole: dict[str, dict[str, float]] = {}
        tail: dict[str, dict[str, float]] = {}
        commands, seconds, reused, at_train = {}, {}, [], {}
        for seed in args.seeds:
            overrides = _overrides(args.preset, steps, seed, scale)
            workdir = runs_root / f"{scale}-seed{seed}"
            final, seconds[str(seed)] = timed_train_run(
                f"{name}, seed {seed}", LM_CONFIG, config_preset, overrides, workdir)
            if final.get("reused"):
                reused.append(seed)
            metrics = final["eval"]
            whole[str(seed)] = {str(n): float(metrics[f"bits_per_byte_{n}"]) for n in lengths}
            tail[str(seed)] = {str(n): float(metrics[f"bits_per_byte_tail_{n}"])
                               for n in lengths}
            at_train[str(seed)] = float(metrics["bits_per_byte"])
            tokens = {"whole": {str(n): float(metrics[f"tokens_{n}"]) for n in lengths},
                      "tail": {str(n): float(metrics[f"tokens_tail_{n}"]) for n in lengths}}
            commands[str(seed)] = train_command(LM_CONFIG, workdir, config_preset, overrides)
            print("[reproduce]   bits/byte (tail) " + "  ".join(
                f"{n}: {whole[str(seed)][str(n)]:.3f} ({tail[str(seed)][str(n)]:.3f})"
                for n in lengths) + f"  ({seconds[str(seed)]:.0f} s)", flush=True)
        variants[name] = {
            "attention_scale": scale, "bits_per_byte": whole, "bits_per_byte_tail": tail,
            "mean": {}, "std": {}, "tail_mean": {}, "tail_std": {},
            "eval_bits_per_byte": at_train, "run_seconds": seconds, "reused_seeds": reused,
            "train_commands": commands}
        for n in lengths:
            key = str(n)
            variants[name]["mean"][key], variants[name]["std"][key] = summary(
                [values[key] for values in whole.values()])
            variants[name]["tail_mean"][key], variants[name]["tail_std"][key] = summary(
                [values[key] for values in tail.values()])
    return {
        "study": "lm_extrapolation",
        "title": "Entropy-invariant attention and length extrapolation (causal LM bits/byte)",
        "spec": "kexue.fm archive 8823",
        "config": LM_CONFIG, "preset": args.preset, "config_preset": config_preset,
        "model_and_data": preset_overrides, "steps": steps, "seeds": list(args.seeds),
        "train_length": TRAIN_LENGTH, "lengths": list(lengths), "entropy_base": 512.0,
        "metric": "bits per byte (log2 loss per held-out byte), whole windows and tail "
                  "(target positions >= 3L/4 of each window)",
        "tokens_scored": tokens, "variants": variants,
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def _cell(mean: float, spread: float | None) -> str:
    return f"{mean:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def _table(record: Mapping[str, Any]) -> str:
    lengths = record["lengths"]
    lines = ["| variant | positions | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for part, mean, std in (("whole window", "mean", "std"),
                            ("tail (last quarter)", "tail_mean", "tail_std")):
        for name, variant in record["variants"].items():
            cells = [_cell(variant[mean][str(n)], variant[std][str(n)]) for n in lengths]
            lines.append(f"| {name} | {part} | " + " | ".join(cells) + " |")
    scored = record["tokens_scored"]
    if scored:
        lines.append("| bytes scored | whole / tail | " + " | ".join(
            f"{scored['whole'][str(n)]:.0f} / {scored['tail'][str(n)]:.0f}"
            for n in lengths) + " |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = record["lengths"]
    colors = {"standard": "tab:blue", "entropy_invariant": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for index, (name, variant) in enumerate(record["variants"].items()):
        color = colors[variant["attention_scale"]]
        x = np.array(lengths) * 2.0 ** (0.03 * (index - 0.5))  # apart, so bars show
        for key, line, label in (("tail", "-", f"{name}, tail (last quarter)"),
                                 ("", ":", f"{name}, whole window")):
            mean = np.array([variant[f"{key}_mean" if key else "mean"][str(n)]
                             for n in lengths])
            std = np.array([variant[f"{key}_std" if key else "std"][str(n)] or 0.0
                            for n in lengths])
            ax.errorbar(x, mean, yerr=std if std.any() else None, color=color,
                        linestyle=line, marker="o" if key else ".", markersize=4,
                        capsize=3, label=label, alpha=1.0 if key else 0.6)
    ax.axvline(record["train_length"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel(f"evaluation length (bytes); trained at {record['train_length']}")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"Byte-level causal LM, {record['steps']} steps, "
                 f"{seeds_label(record['seeds'], ' (mean ± std)')}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    spread = spread_text(record["seeds"])
    model = overrides_text(record["model_and_data"])
    return "\n".join([
        *header_lines(record),
        f"- `{record['config']}` (preset `{record['preset']}`: {model}, "
        f"`data.seq_len={record['train_length']}`), {record['steps']} steps at length "
        f"{record['train_length']}; entropy-invariant scale `log_{record['entropy_base']:g}"
        f"(n_i)/√d`. Held-out bits per byte at each evaluation length, on the same bytes "
        f"for every length (windows of {max(record['lengths'])} cut into shorter ones); "
        f"tail: target positions ≥ ⌊3L/4⌋ of each window; {spread}.",
        "",
        _table(record),
        "",
        f"![bits per byte vs evaluation length]({png_name})",
        "",
    ])
