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

A preset is a list of variants (an optimizer plus overrides: a learning rate of a grid,
`model.norm_position=pre`, a longer warmup); the steps-to-target baseline is the AdamW
variant with the lowest final eval loss (mean over seeds), so a diverged or collapsed
AdamW setting is never the target. For NER each run's encoder collapse is measured at
its last checkpoint (`collapse_measurement`: mean token-to-token cosine of the encoder
output on dev sentences, span-logit statistics), and once for the model at
initialisation. Presets: "default" (the config files' learning rates, both tasks),
"collapse" (NER: AdamW as configured, with pre-norm, with a 3× longer warmup, at a 3×
lower learning rate, and Amos-style Adam as the reference), "gpu_lm" and "gpu_ner" (5
learning rates on a half-decade log grid for every optimizer, on NER plus the pre-norm
and warmup variants of AdamW; 600 steps; for the GPU campaign), "cpu_lm_grid" and
"cpu_ner_grid" (the same learning-rate grid at 300 steps, what 2 CPU cores allow for
one seed) and "smoke".
Amos: arXiv 2210.11693; Amos-style schedules: kexue.fm archive 9344.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
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
    study_config,
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
_TINY = {"model.width": 16, "model.num_layers": 1, "model.num_heads": 2, "model.mlp_dim": 32,
         "train.tensorboard": False}
#: dev batches the collapse measurement reads (32 sentences each at the study's batch).
COLLAPSE_BATCHES = 4
#: The learning-rate grid: the config's learning rate times these (half-decade steps).
LR_FACTORS = (0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trained setting: `optimizer` with `overrides` on top of the task's, its
    learning rate the config's times `lr_factor`; trained on every seed, or on the
    first seed only (`first_seed_only`)."""

    name: str
    optimizer: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr_factor: float = 1.0
    first_seed_only: bool = False


def _defaults(optimizers: Sequence[str]) -> tuple[Variant, ...]:
    return tuple(Variant(opt, opt) for opt in optimizers)


#: AdamW as configured, three changes that might avoid its NER collapse, and the
#: Amos-style reference.
COLLAPSE_VARIANTS = (
    Variant("adamw", "adamw"),
    Variant("adamw, pre-norm", "adamw", {"model.norm_position": "pre"}),
    Variant("adamw, warmup ×3", "adamw", {"optimizer.adamw.warmup_steps": 150}),
    Variant("adamw, lr ÷3", "adamw", lr_factor=10 ** -0.5),
    Variant("amos_style", "amos_style"),
)


def _grid(optimizers: Sequence[str]) -> tuple[Variant, ...]:
    return tuple(Variant(opt if factor == 1.0 else f"{opt}, lr ×{factor:.3g}", opt,
                         lr_factor=factor)
                 for opt in optimizers for factor in LR_FACTORS)


_LM = ("full", {**_SMALL, "data.batch_size": 16, "data.seq_len": 128})
_NER = ("full", {**_SMALL, "model.gp_head_dim": 32, "data.batch_size": 32})
#: Study presets: task -> (the config file's preset, overrides, variants), and the
#: default steps. The smoke preset trains two optimizers (and pre-norm AdamW on NER, the
#: first seed only), to stay fast.
PRESETS: dict[str, tuple[dict[str, tuple[str, dict[str, Any], tuple[Variant, ...]]], int]] = {
    "default": ({"lm": (*_LM, _defaults(TRAINED)), "ner": (*_NER, _defaults(TRAINED))}, 300),
    "collapse": ({"ner": (*_NER, COLLAPSE_VARIANTS)}, 300),
    "cpu_lm_grid": ({"lm": (*_LM, _grid(TRAINED))}, 300),
    "cpu_ner_grid": ({"ner": (*_NER, _grid(TRAINED))}, 300),
    "gpu_lm": ({"lm": (*_LM, _grid(TRAINED))}, 600),
    "gpu_ner": ({"ner": (*_NER, _grid(TRAINED) + COLLAPSE_VARIANTS[1:3])}, 600),
    "smoke": ({
        "lm": ("smoke", _TINY, _defaults(("adamw", "amos"))),
        "ner": ("smoke", {**_TINY, "model.gp_head_dim": 8},
                (*_defaults(("adamw", "amos")),
                 Variant("adamw, pre-norm", "adamw", {"model.norm_position": "pre"},
                         first_seed_only=True))),
    }, 2),
}


def _overrides(preset: str, task: str, steps: int, seed: int,
               variant: Variant) -> dict[str, Any]:
    config_preset, overrides, _ = PRESETS[preset][0][task]
    eval_every = max(steps // EVAL_POINTS, 1)
    result = {
        **overrides,
        "optimizer.name": variant.optimizer,
        **run_schedule(seed, steps, log_points=20, eval_every=eval_every,
                       checkpoint_every=steps if steps % eval_every == 0 else eval_every),
        "optimizer.amos_style.half_life": max(round(TASKS[task][1] * steps), 1),
        **variant.overrides,
    }
    if variant.lr_factor != 1.0:
        config = study_config(TASKS[task][0], config_preset, result)
        rate = float(config.optimizer[variant.optimizer].learning_rate)
        result[f"optimizer.{variant.optimizer}.learning_rate"] = float(
            f"{rate * variant.lr_factor:.4g}")
    return result


def optimizer_memory(config_file: str, preset: str,
                     overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes of the model's parameters and of `tx.init(params)` (shapes only), and settings."""
    import jax

    from experiments import run as experiment_run
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


def _token_cosine_and_logits(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Sums over one dev batch: the token-to-token cosine of the encoder output, and the
    GlobalPointer logits of the spans that exist."""
    import jax.numpy as jnp

    tokens, valid = jnp.asarray(batch["tokens"]), jnp.asarray(batch["valid"]).astype(bool)
    hidden = model.encoder(tokens, valid=valid, deterministic=True).astype(jnp.float32)
    unit = hidden / jnp.maximum(jnp.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)
    cosine = jnp.einsum("bid,bjd->bij", unit, unit)
    n = tokens.shape[1]
    pairs = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(n, dtype=bool)
    logits = model(tokens, valid=valid, deterministic=True)
    spans = jnp.broadcast_to(model.span_validity(logits, valid), logits.shape)
    values = jnp.where(spans, logits, 0.0)
    sentence_max = jnp.max(jnp.where(spans, logits, -jnp.inf), axis=(1, 2, 3))
    return {"cosine_sum": float(jnp.sum(jnp.where(pairs, cosine, 0.0))),
            "pairs": int(jnp.sum(pairs)),
            "logit_sum": float(jnp.sum(values)), "logit_sq_sum": float(jnp.sum(values**2)),
            "spans": int(jnp.sum(spans)), "positive": int(jnp.sum(spans & (logits > 0))),
            "sentence_max": [float(v) for v in sentence_max]}


def collapse_measurement(workdir: Path | None, config: Any = None, *,
                         batches: int = COLLAPSE_BATCHES) -> dict[str, float]:
    """How far a GlobalPointer model's encoder has collapsed, on its first `batches` dev
    batches: `token_cosine`, the mean cosine between the encoder outputs `h_i, h_j` of
    two different real tokens of a sentence (1: every token maps to one direction, so
    no span can be told from another by content), and the span logits over the spans
    that exist: mean, std, max, the share above 0 (a span decodes when its logit is
    > 0) and the median over sentences of a sentence's largest logit.

    `workdir`: a finished NER run, measured at its last checkpoint; None: the model of
    `config` at initialisation.
    """
    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.train import Checkpointer, abstract_train_state

    if workdir is not None:
        config = experiment_config.load_saved(os.fspath(workdir))
    run = experiment_run.build(config)
    if workdir is None:
        model = run.model_factory()
    else:
        abstract = abstract_train_state(run.model_factory, run.tx, run.mesh,
                                        seed=run.loop.seed)
        checkpoints = Checkpointer(os.path.join(os.fspath(workdir), "checkpoints"),
                                   read_only=True)
        try:
            restored = checkpoints.restore_latest(abstract)
        finally:
            checkpoints.close()
        if restored is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        model = restored.state.model()
    sums = [_token_cosine_and_logits(model, batch)
            for _, batch in itertools.islice(run.eval_data(), batches)]
    total = {key: sum(s[key] for s in sums) for key in
             ("cosine_sum", "pairs", "logit_sum", "logit_sq_sum", "spans", "positive")}
    mean = total["logit_sum"] / total["spans"]
    maxima = [v for s in sums for v in s["sentence_max"]]
    return {
        "token_cosine": total["cosine_sum"] / total["pairs"],
        "logit_mean": mean,
        "logit_std": float(np.sqrt(max(total["logit_sq_sum"] / total["spans"] - mean**2,
                                       0.0))),
        "logit_max": max(maxima),
        "sentence_max_logit_median": float(np.median(maxima)),
        "positive_share": total["positive"] / total["spans"],
        "sentences": len(maxima),
    }


def _collapse_of_run(workdir: Path, reused: bool) -> dict[str, float]:
    """`collapse_measurement(workdir)`, kept in `<workdir>/collapse.json` and read back
    from there when the run itself is read back (the run, and so its last checkpoint,
    is unchanged)."""
    path = workdir / "collapse.json"
    if reused and path.exists():
        return json.loads(path.read_text())
    measured = collapse_measurement(workdir)
    path.write_text(json.dumps(measured, indent=1) + "\n")
    return measured


def _slug(name: str) -> str:
    return (name.replace(", ", "-").replace(" ", "").replace("×", "x").replace("÷", "div")
            .replace("/", "-"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 5: trains task × variant × seeds; returns the results record."""
    tasks, default_steps = PRESETS[args.preset]
    steps = args.steps or default_steps
    seeds = list(args.seeds)
    runs_root = Path(args.runs) / "optimizers" / f"{args.preset}-{steps}steps"
    started = time.perf_counter()
    memory, entries, collapse_at_init = {}, {}, {}
    for task, (config_preset, _, variants) in tasks.items():
        config_file = TASKS[task][0]
        optimizers = list(dict.fromkeys(v.optimizer for v in variants))
        memory[task] = {opt: optimizer_memory(config_file, config_preset,
                                              _overrides(args.preset, task, steps, 0,
                                                         Variant(opt, opt)))
                        for opt in (*optimizers, *MEMORY_ONLY)}
        entries[task] = {}
        for v in variants:
            overrides = _overrides(args.preset, task, steps, seeds[0], v)
            config = study_config(config_file, config_preset, overrides)
            entries[task][v.name] = {
                "optimizer": v.optimizer, "overrides": dict(v.overrides),
                "lr_factor": v.lr_factor,
                "settings": config.optimizer[v.optimizer].to_dict(),
                "seeds": seeds[:1] if v.first_seed_only else seeds,
                "scores": {}, "run_seconds": {}, "reused_seeds": [], "train_commands": {}}
        if task == "ner":
            collapse_at_init[task] = collapse_measurement(None, study_config(
                config_file, config_preset,
                _overrides(args.preset, task, steps, seeds[0], variants[0])))
    for seed in seeds:  # seeds outermost: an interrupted study has whole seeds
        for task, (config_preset, _, variants) in tasks.items():
            config_file = TASKS[task][0]
            for v in variants:
                entry = entries[task][v.name]
                if seed not in entry["seeds"]:
                    continue
                overrides = _overrides(args.preset, task, steps, seed, v)
                workdir = runs_root / f"{task}-{_slug(v.name)}-seed{seed}"
                final, entry["run_seconds"][str(seed)] = timed_train_run(
                    f"{task}, {v.name}, seed {seed}", config_file, config_preset, overrides,
                    workdir)
                if final.get("reused"):
                    entry["reused_seeds"].append(seed)
                curves = read_curves(workdir)
                scores = entry["scores"][str(seed)] = {
                    "curves": curves, "final_train_loss": curves["train"][-1][1],
                    "final_eval_loss": float(final["eval"]["loss"]),
                    **({"final_f1": float(final["eval"]["f1"]),
                        "collapse": _collapse_of_run(workdir, final.get("reused", False))}
                       if task == "ner" else {}),
                }
                entry["train_commands"][str(seed)] = train_command(
                    config_file, workdir, config_preset, overrides)
                print(f"[reproduce]   train loss {scores['final_train_loss']:.4f}"
                      f"  eval loss {scores['final_eval_loss']:.4f}"
                      + (f"  F1 {100 * scores['final_f1']:.2f}  token cosine "
                         f"{scores['collapse']['token_cosine']:.3f}" if task == "ner" else "")
                      + f"  ({entry['run_seconds'][str(seed)]:.0f} s)", flush=True)
    results: dict[str, Any] = {}
    for task, (config_preset, preset_overrides, _) in tasks.items():
        _summarise(entries[task], memory[task])
        results[task] = {"config": TASKS[task][0], "config_preset": config_preset,
                         "model_and_data": preset_overrides, "variants": entries[task],
                         "memory": memory[task]}
        if task in collapse_at_init:
            results[task]["collapse_at_init"] = collapse_at_init[task]
    return {
        "study": "optimizers",
        "title": "Amos and Amos-style Adam vs AdamW: loss against steps, optimizer memory",
        "spec": "arXiv 2210.11693; kexue.fm archive 9344",
        "preset": args.preset, "steps": steps, "seeds": seeds,
        "memory_only": list(MEMORY_ONLY), "tasks": results,
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def _finite_or_inf(value: float) -> float:
    return value if np.isfinite(value) else float("inf")


def _summarise(variants: dict[str, Any], memory: Mapping[str, Any]) -> None:
    """Means over seeds, each optimizer's best variant (lowest mean final eval loss) and
    the steps to reach the best AdamW variant's final (mean) losses, in place."""
    for entry in variants.values():
        for key in ("final_train_loss", "final_eval_loss", "final_f1"):
            values = [s[key] for s in entry["scores"].values() if key in s]
            if values:
                entry[key] = dict(zip(("mean", "std"), summary(values), strict=True))
        collapse = [s["collapse"] for s in entry["scores"].values() if "collapse" in s]
        if collapse:
            entry["collapse"] = {key: float(np.mean([c[key] for c in collapse]))
                                 for key in collapse[0]}
        entry["state_bytes"] = memory[entry["optimizer"]]["state_bytes"]
    for opt in dict.fromkeys(e["optimizer"] for e in variants.values()):
        best = min((name for name, e in variants.items() if e["optimizer"] == opt),
                   key=lambda name: _finite_or_inf(variants[name]["final_eval_loss"]["mean"]))
        for name, entry in variants.items():
            if entry["optimizer"] == opt:
                entry["best_of_optimizer"] = name == best
    baseline = next((name for name, e in variants.items()
                     if e["optimizer"] == "adamw" and e["best_of_optimizer"]), None)
    for entry in variants.values():
        entry["baseline"] = baseline
        if baseline is None:
            continue
        for split in ("train", "eval"):
            target = variants[baseline][f"final_{split}_loss"]["mean"]
            reached = [steps_to_reach(s["curves"][split], target)
                       for s in entry["scores"].values()]
            entry[f"steps_to_adamw_{split}"] = {
                "target": target, "per_seed": reached,
                "mean_of_reached": (float(np.mean([r for r in reached if r is not None]))
                                    if any(r is not None for r in reached) else None),
                "reached": sum(r is not None for r in reached), "seeds": len(reached)}
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


def _steps_cell(entry: Mapping[str, Any], split: str) -> str:
    info = entry.get(f"steps_to_adamw_{split}")
    if info is None:
        return "–"
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


def _variant_label(name: str, entry: Mapping[str, Any]) -> str:
    label = OPTIMIZER_NAMES[entry["optimizer"]] + name[len(entry["optimizer"]):]
    return f"**{label}**" if entry.get("best_of_optimizer") and len(entry["seeds"]) else label


def _table(record: Mapping[str, Any], task: str) -> str:
    result = record["tasks"][task]
    ner = task == "ner"
    head = ("| optimizer | settings | seeds | final train loss | final eval loss | "
            + ("dev span F1 (%) | " if ner else "")
            + "steps to best AdamW's eval loss | steps to best AdamW's train loss | "
            "optimizer state (KiB) | × AdamW |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    memory = result["memory"]
    for name, entry in result["variants"].items():
        opt = entry["optimizer"]
        settings = _settings_text(opt, entry["settings"])
        if entry["overrides"]:
            settings += "; " + ", ".join(f"`{k}={flag_value(v)}`"
                                         for k, v in entry["overrides"].items())
        cells = [", ".join(map(str, entry["seeds"])),
                 _loss_cell(entry.get("final_train_loss")),
                 _loss_cell(entry.get("final_eval_loss"))]
        if ner:
            cells.append(_loss_cell(entry.get("final_f1"), 100, 2))
        cells += [_steps_cell(entry, "eval"), _steps_cell(entry, "train")]
        lines.append(f"| {_variant_label(name, entry)} | {settings} | " + " | ".join(cells)
                     + f" | {memory[opt]['state_bytes'] / 1024:.0f} | "
                     f"{memory[opt]['relative_to_adamw']:.2f} |")
    for opt in record["memory_only"]:
        lines.append(f"| {OPTIMIZER_NAMES[opt]} | {_settings_text(opt, memory[opt]['settings'])}"
                     " | not trained | – | – | " + ("– | " if ner else "") + "– | – | "
                     f"{memory[opt]['state_bytes'] / 1024:.0f} | "
                     f"{memory[opt]['relative_to_adamw']:.2f} |")
    return "\n".join(lines)


def _collapse_table(record: Mapping[str, Any]) -> str:
    result = record["tasks"]["ner"]
    lines = ["| model | token-to-token cosine | span logit mean | std | max | share > 0 | "
             "median of a sentence's max | dev span F1 (%) |", "|---|---|---|---|---|---|---|---|"]

    def row(label: str, c: Mapping[str, float], f1: str) -> str:
        return (f"| {label} | {c['token_cosine']:.3f} | {c['logit_mean']:.2f} | "
                f"{c['logit_std']:.2f} | {c['logit_max']:.2f} | {100 * c['positive_share']:.3f}% "
                f"| {c['sentence_max_logit_median']:.2f} | {f1} |")

    lines.append(row("at initialisation (seed of the first run)",
                     result["collapse_at_init"], "–"))
    for name, entry in result["variants"].items():
        if "collapse" in entry:
            lines.append(row(f"{_variant_label(name, entry)}, step {record['steps']}",
                             entry["collapse"], _loss_cell(entry.get("final_f1"), 100, 2)))
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(record["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.0 * len(tasks), 4.2), dpi=120,
                             squeeze=False)
    styles = itertools.cycle(["-", "--", ":", "-."])
    for ax, task in zip(axes[0], tasks, strict=True):
        for name, entry in record["tasks"][task]["variants"].items():
            best = entry.get("best_of_optimizer", False)
            color = COLORS[entry["optimizer"]]
            style = "-" if name == entry["optimizer"] else next(styles)
            curves = [np.asarray(s["curves"]["eval"]) for s in entry["scores"].values()]
            length = min((len(c) for c in curves), default=0)
            if not length:
                continue
            steps = curves[0][:length, 0]
            values = np.stack([c[:length, 1] for c in curves])
            ax.plot(steps, values.mean(0), style, marker="o", markersize=3, color=color,
                    linewidth=2.0 if best else 1.0, alpha=1.0 if best else 0.6,
                    label=_variant_label(name, entry).replace("**", "") + " (eval)")
        ax.set_title(TASK_NAMES[task] + " (bold line: each optimizer's best)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{record['steps']} steps, {seeds_label(record['seeds'])}: eval loss, mean "
                 "over seeds", fontsize=9)
    save_figure(fig, path)


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    seeds = record["seeds"]
    runs = [e for t in record["tasks"].values() for e in t["variants"].values()]
    reused = sum(len(e.get("reused_seeds", ())) for e in runs)
    total = sum(len(e["seeds"]) for e in runs)
    runtime = f"total {record['runtime_s'] / 60:.1f} min" + (
        f"; {reused} of {total} runs read back from an earlier invocation" if reused else "")
    spread = spread_text(seeds)
    lines = [
        f"# {record['title']}",
        "",
        f"- Date: {record['date']}; machine: {record['machine']}",
        f"- Command: `{record['command']}` ({runtime})",
        f"- Preset `{record['preset']}`: {record['steps']} steps per run, eval every "
        f"{max(record['steps'] // EVAL_POINTS, 1)} steps; {spread}. Losses: train = mean "
        f"over the last logged interval ({max(record['steps'] // 20, 1)} steps), eval = the "
        "whole eval set. Bold: each optimizer's best variant (lowest mean final eval "
        "loss). \"Steps to best AdamW's loss\": first step at which the logged curve "
        "reaches the final loss of AdamW's best variant (mean over seeds), interpolated "
        "linearly between logged points; mean over the seeds that reach it. Optimizer "
        "state: bytes of `tx.init(params)` (float32).",
    ]
    for task, result in record["tasks"].items():
        model = ", ".join(f"`{k}={flag_value(v)}`" for k, v in result["model_and_data"].items())
        params = result["memory"]["adamw"]["param_bytes"]
        lines += ["", f"**{TASK_NAMES[task]}**: `{result['config']}` (preset "
                      f"`{record['preset']}`: {model}); parameters {params / 1024:.0f} KiB.",
                  "", _table(record, task)]
    if "ner" in record["tasks"]:
        lines += ["", "**Encoder collapse (NER)**, on the first "
                  f"{record['tasks']['ner']['collapse_at_init']['sentences']} dev sentences "
                  "at the last step (mean over seeds): token-to-token cosine = mean cosine "
                  "between the encoder outputs of two different real tokens of a sentence; "
                  "span logits over the spans that exist (a span is predicted when its logit "
                  "is > 0).", "", _collapse_table(record)]
    lines += ["", f"![eval loss against steps]({png_name})", ""]
    return "\n".join(lines)
