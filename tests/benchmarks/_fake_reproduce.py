"""A stand-in for `python -m experiments.reproduce` in the campaign's studies tests.

Same command line (`STUDY [--preset P] [--seeds ...] [--steps N] --out DIR --runs DIR`,
or `STUDY --list-presets`), no training: it writes `<out>/<study>.json` and `.md` with
a record shaped like the real study's, whose values are a known function of (variant,
seed, length), so a test can check every cell. A seed it has "trained" leaves a
marker in `--runs`; a later call with that seed reads it back and lists it among the
variants' `reused_seeds`, as the real driver reuses finished runs.

Environment: `FAKE_REPRODUCE_FAIL_SEED=s` makes a call with seed `s` exit 1 before
writing anything; `FAKE_REPRODUCE_SLEEP=t` sleeps `t` seconds first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PRESETS = {
    "entropy_invariance": ["default", "gpu", "smoke"],
    "lm_extrapolation": ["default", "gpu", "smoke"],
    "globalpointer": ["default", "gpu", "smoke"],
    "rdrop": ["default", "gpu", "gpu_subset", "smoke"],
    "optimizers": ["default", "smoke"],
}
LENGTHS = [64, 128, 256]
MLM_VARIANTS = ["standard", "standard + random positions", "entropy-invariant",
                "entropy-invariant + random positions"]
LM_VARIANTS = ["standard", "entropy-invariant"]


def value(variant: int, seed: int, length: int, tail: bool = False) -> float:
    """The fake metric: distinct per variant, seed, length and part."""
    return round(0.5 + 0.1 * variant + 0.01 * seed + length / 10000 + 0.2 * tail, 6)


def summary(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def record(study: str, preset: str, seeds: list[int], steps: int, reused: list[int],
           command: str) -> dict:
    names = MLM_VARIANTS if study == "entropy_invariance" else LM_VARIANTS
    metrics = ([("accuracy", "mean", "std", False)] if study == "entropy_invariance" else
               [("bits_per_byte", "mean", "std", False),
                ("bits_per_byte_tail", "tail_mean", "tail_std", True)])
    variants = {}
    for index, name in enumerate(names):
        variant = {"reused_seeds": reused, "train_commands": {
            str(s): f"python -m experiments.train --seed {s}" for s in seeds}}
        for key, mean_key, std_key, tail in metrics:
            variant[key] = {str(s): {str(n): value(index, s, n, tail) for n in LENGTHS}
                            for s in seeds}
            variant[mean_key], variant[std_key] = {}, {}
            for n in LENGTHS:
                variant[mean_key][str(n)], variant[std_key][str(n)] = summary(
                    [value(index, s, n, tail) for s in seeds])
        variants[name] = variant
    return {"study": study, "title": f"Fake {study}", "config": f"configs/{study}.py",
            "preset": preset, "model_and_data": {"model.width": 8, "data.batch_size": 4},
            "steps": steps, "seeds": seeds, "train_length": 64, "lengths": LENGTHS,
            "metric": "a fake metric", "variants": variants, "runtime_s": 0.1,
            "date": "2026-12-01", "command": command,
            "machine": "fake, XLA_PYTHON_CLIENT_MEM_FRACTION="
                       f"{os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("study")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out")
    parser.add_argument("--runs")
    parser.add_argument("--list-presets", action="store_true")
    args = parser.parse_args()
    if args.list_presets:
        print(json.dumps(PRESETS[args.study]))
        return 0
    time.sleep(float(os.environ.get("FAKE_REPRODUCE_SLEEP", "0")))
    if str(os.environ.get("FAKE_REPRODUCE_FAIL_SEED")) in map(str, args.seeds):
        print("fake failure", file=sys.stderr)
        return 1
    runs = os.path.join(args.runs, args.study, args.preset)
    os.makedirs(runs, exist_ok=True)
    reused = []
    for seed in args.seeds:
        marker = os.path.join(runs, f"seed{seed}")
        if os.path.exists(marker):
            reused.append(seed)
        else:
            open(marker, "w").close()
    os.makedirs(args.out, exist_ok=True)
    command = " ".join(["python", "-m", "experiments.reproduce", *sys.argv[1:]])
    doc = record(args.study, args.preset, args.seeds, args.steps or 100, reused, command)
    with open(os.path.join(args.out, f"{args.study}.json"), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(args.out, f"{args.study}.md"), "w") as f:
        f.write(f"# {doc['title']}\n\n- Command: `{command}`\n\n| a | b |\n|---|---|\n"
                f"| {args.preset} | {' '.join(map(str, args.seeds))} |\n\n![plot](x.png)\n")
    print(f"fake {args.study} {args.preset} seeds {args.seeds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
