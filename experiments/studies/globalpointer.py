"""Study 2: GlobalPointer on CLUENER against its ablations and a BIO tagger.

kexue.fm/archives/8373 (GlobalPointer), 8877 (Efficient GlobalPointer).

A character-level RoFormer encoder trained from scratch on CLUENER 2020
(`configs/cluener_globalpointer.py`, `configs/cluener_bio.py`), one run per seed of
each head: GlobalPointer with RoPE, without RoPE (`model.gp_rope=False`), Efficient
GlobalPointer, and a token-level softmax BIO tagger; span precision / recall / F1 on
the whole dev set, evaluated several times during training (`metrics.jsonl`), reported
at the best evaluation and its step (as the reference script keeps its best epoch)
and at the last step. Plus GlobalPointer with the
sparse ZLPR loss (`model.gp_loss=sparse`, the same loss without the dense label
tensor) for the first seed, and the compiled peak memory
(`memory_analysis()` of the jitted loss + gradient) and interleaved median time of
the dense and sparse GlobalPointer training step at the training shape and at
`n = 512`. kexue.fm archives 8373, 8877, 7359.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.studies.common import (
    best_evaluation,
    cell,
    eval_curve,
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

GP_CONFIG = "configs/cluener_globalpointer.py"
BIO_CONFIG = "configs/cluener_bio.py"
#: (name, config file, overrides): the heads compared on every seed.
GP_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("GlobalPointer (RoPE)", GP_CONFIG, {"model.efficient": False, "model.gp_rope": True}),
    ("GlobalPointer, no RoPE", GP_CONFIG, {"model.efficient": False, "model.gp_rope": False}),
    ("Efficient GlobalPointer", GP_CONFIG, {"model.efficient": True, "model.gp_rope": True}),
    ("BIO softmax tagger", BIO_CONFIG, {}),
)
#: Trained on the first seed only: same math as the dense GlobalPointer (RoPE).
SPARSE_VARIANT = ("GlobalPointer (RoPE), sparse ZLPR", GP_CONFIG,
                  {"model.efficient": False, "model.gp_rope": True, "model.gp_loss": "sparse"})
_SMALL = {"model.width": 128, "model.num_layers": 2, "model.num_heads": 4,
          "model.mlp_dim": 512, "data.batch_size": 32}
#: Study presets: (the config files' preset, overrides, default steps, dev evaluations
#: per run, memory lengths, timing repeats). The config file's model (width 256, 4
#: layers, 3000 steps) takes hours per variant and seed on a 2-core CPU; "default" is a
#: small encoder (0.45 s per step on 2 CPU cores), "gpu" the same encoder trained for
#: the config file's 3000 steps (about 10 epochs of CLUENER), for the GPU campaign.
PRESETS: dict[str, tuple[str, dict[str, Any], int, int, tuple[int, ...], int]] = {
    "default": ("full", _SMALL, 800, 8, (64, 512), 10),
    "gpu": ("full", _SMALL, 3000, 15, (64, 512), 20),
    "smoke": ("smoke", {
        "model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "data.batch_size": 8, "optimizer.name": "adamw",
        "train.tensorboard": False,
    }, 2, 2, (16,), 2),
}
NUM_TYPES = 10  # CLUENER 2020


def _optimizer_text(overrides: Mapping[str, Any]) -> str:
    if overrides.get("optimizer.name", "amos_style") != "amos_style":
        return f"{overrides['optimizer.name']} (the config's defaults)"
    return ("the config's amos_style (Adam direction, learning rate 0.01, inverse-square decay "
            "with half-life steps/2)")


def _overrides(preset: str, steps: int, seed: int, config_file: str,
               variant: Mapping[str, Any]) -> dict[str, Any]:
    _, overrides, _, evals, _, _ = PRESETS[preset]
    every = max(steps // evals, 1)
    return {
        **overrides, **variant,
        **run_schedule(seed, steps, log_points=10, eval_every=every,
                       checkpoint_every=steps if steps % every == 0 else every * evals),
        # The config's Amos-style decay (half-life 1500 of 3000 steps), at this length.
        "optimizer.amos_style.half_life": max(steps // 2, 1),
    }


def _train(runs_root: Path, name: str, config_file: str, variant: Mapping[str, Any],
           preset: str, steps: int, seeds: list[int]) -> dict[str, Any]:
    config_preset = PRESETS[preset][0]
    per_seed: dict[str, dict[str, Any]] = {}
    commands, seconds, reused = {}, {}, []
    slug = name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
    for seed in seeds:
        overrides = _overrides(preset, steps, seed, config_file, variant)
        workdir = runs_root / f"{slug}-seed{seed}"
        final, seconds[str(seed)] = timed_train_run(
            f"{name}, seed {seed}", config_file, config_preset, overrides, workdir)
        if final.get("reused"):
            reused.append(seed)
        metrics = final["eval"]
        curve = eval_curve(workdir)
        best_step, best = best_evaluation(curve)
        per_seed[str(seed)] = {
            **{key: float(metrics[key]) for key in
               ("f1", "precision", "recall", "tp", "fp", "fn", "gold_spans",
                "bio_unrepresentable") if key in metrics},
            "best_step": best_step,
            **{f"best_{key}": best[key] for key in ("f1", "precision", "recall", "tp", "fp",
                                                     "fn")},
            "f1_curve": {step: values["f1"] for step, values in curve.items()},
        }
        commands[str(seed)] = train_command(config_file, workdir, config_preset, overrides)
        print(f"[reproduce]   dev F1 best {100 * best['f1']:.2f} at step {best_step}, last "
              f"{100 * per_seed[str(seed)]['f1']:.2f}  ({seconds[str(seed)]:.0f} s)",
              flush=True)
    result: dict[str, Any] = {"config": config_file, "overrides": dict(variant),
                              "seeds": seeds, "scores": per_seed, "run_seconds": seconds,
                              "reused_seeds": reused, "train_commands": commands}
    for key in ("f1", "precision", "recall", "best_f1", "best_precision", "best_recall",
                "best_step"):
        result[f"{key}_mean"], result[f"{key}_std"] = summary(
            [scores[key] for scores in per_seed.values()])
    return result


def _model_params(config_file: str, preset: str, variant: Mapping[str, Any]) -> int:
    from flax import nnx

    from experiments.config import model_settings
    from experiments.studies.common import study_config
    from kexue import models

    overrides = _overrides(preset, 1, 0, config_file, variant)
    config = study_config(config_file, PRESETS[preset][0], overrides)
    spec = models.ModelSpec.from_settings({**model_settings(config), "vocab_size": 1,
                                           "num_types": NUM_TYPES})
    abstract = nnx.eval_shape(lambda: models.build_model(spec, rngs=nnx.Rngs(0)))
    return models.count_params(abstract) - models.count_params(abstract.encoder)


def _loss_memory_and_time(preset: str, lengths: tuple[int, ...], repeats: int,
                          vocab_size: int) -> list[dict[str, Any]]:
    """Dense vs sparse ZLPR: compiled memory and step time of loss + gradient (all params)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.config import model_settings
    from experiments.studies.common import study_config
    from kexue import models, tasks
    from kexue.train import interleaved_median_times

    rows = []
    for n in lengths:
        fns, stats = [], {}
        for kind in ("dense", "sparse"):
            overrides = _overrides(preset, 1, 0, GP_CONFIG, {**SPARSE_VARIANT[2],
                                                             "model.gp_loss": kind})
            config = study_config(GP_CONFIG, PRESETS[preset][0], overrides)
            spec = models.ModelSpec.from_settings({**model_settings(config),
                                                   "vocab_size": vocab_size,
                                                   "num_types": NUM_TYPES})
            b, spans = int(config.data.batch_size), int(config.data.max_spans)
            loss_fn = tasks.NERTask(num_types=NUM_TYPES).loss
            model = models.build_model(spec, rngs=nnx.Rngs(0))
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            params, rest = nnx.as_pure(params), nnx.as_pure(rest)
            rng = np.random.default_rng(n)
            lengths_b = rng.integers(n // 2, n + 1, b)
            starts = rng.integers(0, n // 2, (b, spans // 2))
            ends = starts + rng.integers(0, 4, (b, spans // 2))
            kinds = rng.integers(0, NUM_TYPES, (b, spans // 2))
            gold = np.full((b, spans, 3), -1, np.int32)
            gold[:, : spans // 2] = np.stack([kinds, starts, ends], axis=-1)
            batch = {"tokens": jnp.asarray(rng.integers(4, vocab_size, (b, n)), jnp.int32),
                     "valid": jnp.asarray(np.arange(n)[None, :] < lengths_b[:, None]),
                     "spans": jnp.asarray(gold),
                     "example_weights": jnp.ones((b,), jnp.float32)}

            def loss_and_grad(params, rest, batch, graphdef=graphdef, loss_fn=loss_fn):
                def loss(params, rest):  # `rest` (the dropout stream) traced with params
                    return loss_fn(nnx.merge(graphdef, params, rest), batch, None)[0]
                return jax.value_and_grad(loss)(params, rest)

            compiled = jax.jit(loss_and_grad).lower(params, rest, batch).compile()
            memory = compiled.memory_analysis()
            stats[kind] = {
                "temp_bytes": int(memory.temp_size_in_bytes),
                "peak_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
                "loss": float(compiled(params, rest, batch)[0]),
            }
            fns.append(lambda compiled=compiled, p=params, r=rest, x=batch: compiled(p, r, x))
        times = interleaved_median_times(fns, repeats=repeats, warmup=1)
        for kind, seconds in zip(("dense", "sparse"), times, strict=True):
            stats[kind]["step_ms"] = 1e3 * seconds
        rows.append({"batch": b, "seq_len": n, "types": NUM_TYPES, **stats})
        print(f"[reproduce]   n={n}: dense {stats['dense']['peak_bytes'] / 2**20:.1f} MiB "
              f"{stats['dense']['step_ms']:.1f} ms, sparse "
              f"{stats['sparse']['peak_bytes'] / 2**20:.1f} MiB "
              f"{stats['sparse']['step_ms']:.1f} ms", flush=True)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Study 2: trains the heads × seeds (+ sparse ZLPR, first seed), measures the loss."""
    print(f"[reproduce] globalpointer, preset {args.preset}", flush=True)
    config_preset, preset_overrides, default_steps, evals, lengths, repeats = \
        PRESETS[args.preset]
    steps = args.steps or default_steps
    seeds = list(args.seeds)
    runs_root = Path(args.runs) / "globalpointer" / f"{args.preset}-{steps}steps"
    started = time.perf_counter()
    variants: dict[str, Any] = {}
    for name, config_file, variant in (*GP_VARIANTS, SPARSE_VARIANT):
        chosen = seeds[:1] if name == SPARSE_VARIANT[0] else seeds
        variants[name] = _train(runs_root, name, config_file, variant, args.preset, steps,
                                chosen)
        variants[name]["head_params"] = _model_params(config_file, args.preset, variant)
    vocab_size = _vocab_size(runs_root)
    print("[reproduce] dense vs sparse ZLPR: memory and step time", flush=True)
    memory = _loss_memory_and_time(args.preset, lengths, repeats, vocab_size)
    return {
        "study": "globalpointer",
        "title": "GlobalPointer vs its ablations and BIO tagging on CLUENER (span F1)",
        "spec": "kexue.fm archives 8373, 8877, 7359",
        "configs": [GP_CONFIG, BIO_CONFIG], "preset": args.preset,
        "config_preset": config_preset, "model_and_data": preset_overrides, "steps": steps,
        "seeds": seeds, "optimizer": _optimizer_text(preset_overrides),
        "eval_every": max(steps // evals, 1),
        "metric": "dev span F1", "variants": variants, "zlpr_memory": memory,
        "vocab_size": vocab_size, "runtime_s": round(time.perf_counter() - started, 1),
    }


def _vocab_size(runs_root: Path) -> int:
    """The character vocabulary the runs trained with (from the data of a finished run)."""
    import json

    from kexue.data import DataConfig, make_dataset

    for path in sorted(runs_root.glob("*/config.json")):
        data = DataConfig.from_settings(json.loads(path.read_text())["data"])
        return make_dataset(data, "eval", process_index=0, process_count=1).metadata.vocab_size
    raise FileNotFoundError(f"no finished run under {runs_root}")


def _step_cell(v: Mapping[str, Any]) -> str:
    steps = [scores["best_step"] for scores in v["scores"].values()]
    return " / ".join(map(str, steps))


def _f1_table(record: Mapping[str, Any]) -> str:
    lines = ["| head | best dev F1 | step of best | precision at best | recall at best | "
             f"F1 at step {record['steps']} | head params | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in record["variants"].items():
        lines.append(f"| {name} | {cell(v['best_f1_mean'], v['best_f1_std'])} | "
                     f"{_step_cell(v)} | "
                     f"{cell(v['best_precision_mean'], v['best_precision_std'])} | "
                     f"{cell(v['best_recall_mean'], v['best_recall_std'])} | "
                     f"{cell(v['f1_mean'], v['f1_std'])} | {v['head_params']:,} | "
                     f"{', '.join(map(str, v['seeds']))} |")
    return "\n".join(lines)


def _memory_table(record: Mapping[str, Any]) -> str:
    lines = ["| shape [b, types, n, n] | loss | peak MiB | temp MiB | step ms (median) | "
             "loss value |", "|---|---|---|---|---|---|"]
    for row in record["zlpr_memory"]:
        shape = f"[{row['batch']}, {row['types']}, {row['seq_len']}, {row['seq_len']}]"
        for kind in ("dense", "sparse"):
            s = row[kind]
            lines.append(f"| {shape} | {kind} | {s['peak_bytes'] / 2**20:.1f} | "
                         f"{s['temp_bytes'] / 2**20:.1f} | {s['step_ms']:.1f} | "
                         f"{s['loss']:.6f} |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["variants"])
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12.0, 4.8), dpi=120)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for index, name in enumerate(names):
        v = record["variants"][name]
        color = colors[index % len(colors)]
        scores = [100 * s["best_f1"] for s in v["scores"].values()]
        bars.bar(index, 100 * v["best_f1_mean"], color=color, alpha=0.7,
                 yerr=100 * v["best_f1_std"] if v["best_f1_std"] else None, capsize=4)
        bars.scatter([index] * len(scores), scores, color="black", s=12, zorder=3)
        bars.text(index, 100 * v["best_f1_mean"] + 0.5, f"{100 * v['best_f1_mean']:.1f}",
                  ha="center", va="bottom", fontsize=8)
        runs = [s["f1_curve"] for s in v["scores"].values()]
        steps = sorted({int(step) for run in runs for step in run})
        mean = [100 * np.mean([run[str(step)] for run in runs if str(step) in run])
                for step in steps]
        curves.plot(steps, mean, marker="o", markersize=3, color=color, label=name)
    bars.set_xticks(range(len(names)), [textwrap.fill(n, 16) for n in names], fontsize=7)
    bars.set_ylabel("best dev span F1 (%)")
    bars.set_title("best evaluation; " + (
        f"bars: mean ± std over {seeds_label(record['seeds'])}, dots: runs"
        if len(record["seeds"]) > 1 else f"seed {record['seeds'][0]}"), fontsize=9)
    bars.grid(True, axis="y", alpha=0.3)
    curves.set_xlabel("training step")
    curves.set_ylabel("dev span F1 (%)")
    curves.set_title(f"dev F1 during training (mean over seeds); {record['steps']} steps",
                     fontsize=9)
    curves.grid(True, alpha=0.3)
    curves.legend(fontsize=7)
    save_figure(fig, path)


def _dev_set(record: Mapping[str, Any]) -> str:
    return ("the first 32 dev sentences (smoke preset)" if record["preset"] == "smoke"
            else "all 1343 dev sentences")


def markdown(record: Mapping[str, Any], png_name: str) -> str:
    seeds = record["seeds"]
    reused = sum(len(v.get("reused_seeds", ())) for v in record["variants"].values())
    total = sum(len(v["seeds"]) for v in record["variants"].values())
    runtime = runtime_text(record["runtime_s"], reused, total)
    spread = spread_text(seeds)
    model = overrides_text(record["model_and_data"])
    bio = record["variants"].get("BIO softmax tagger", {}).get("scores", {})
    first = next(iter(bio.values()), {})
    bio_note = (f" The BIO tags cannot represent {int(first['bio_unrepresentable'])} of the "
                f"{int(first['gold_spans'])} gold dev spans (overlapping spans); they stay in "
                "the gold set, as misses." if "gold_spans" in first else "")
    memory = record["zlpr_memory"]
    return "\n".join([
        f"# {record['title']}",
        "",
        f"- Date: {record['date']}; machine: {record['machine']}",
        f"- Command: `{record['command']}` ({runtime})",
        f"- `{record['configs'][0]}` / `{record['configs'][1]}` (preset "
        f"`{record['preset']}`: {model}), {record['steps']} steps, optimizer "
        f"{record['optimizer']}; dev span P/R/F1 (%) over {_dev_set(record)}, evaluated "
        f"every {record['eval_every']} steps; best: the evaluation with the highest F1 "
        f"(step of best: per seed); {spread}. "
        "The sparse-ZLPR row is trained on the first seed only (same init and batches as "
        "the dense run of that seed). Head params: parameters on top of the encoder."
        f"{bio_note}",
        "",
        _f1_table(record),
        "",
        f"![best dev F1 per head and F1 during training]({png_name})",
        "",
        "Dense vs sparse ZLPR, GlobalPointer (RoPE) loss + gradient w.r.t. all parameters, "
        "jitted: compiled `memory_analysis()` (peak = arguments + outputs + temporaries − "
        "aliased) and the interleaved median step time on this machine (shared, so times "
        f"are indicative; ratios are what to read); batch {memory[0]['batch']}, random "
        "spans.",
        "",
        _memory_table(record),
        "",
    ])
