"""How long it takes to get a trained model back: `kexue.load` against the full build.

    python -m experiments.time_load --workdir runs/lm_stdlib [--repeats 3] [--out F.json]

Times, side by side in one process and interleaved, the two ways to the parameters of
the newest checkpoint of a run:

* `kexue.load(workdir)`: `model.json`, the tokenizer, and the `params` / `model_state`
  subtrees of the checkpoint restored onto one device;
* what `experiments.evaluate` does before its first batch: the saved config checked,
  both data pipelines and the optimizer built (Amos reads the initial parameters), the
  abstract train state, and the whole checkpoint restored (optimizer slots and data
  state included).

The first call of each includes tracing and compilation, so it is reported apart from
the median of the others. Prints a table and writes the numbers as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any


def _load(workdir: str) -> int:
    import jax

    import kexue

    trained = kexue.load(workdir)
    jax.block_until_ready(jax.tree.leaves(trained.model))
    return trained.step


def _build_and_restore(workdir: str) -> int:
    import jax

    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.train import Checkpointer, abstract_train_state

    config = experiment_config.load_saved(workdir)
    experiment_config.check(config)
    run = experiment_run.build(config)
    abstract = abstract_train_state(run.model_factory, run.tx, run.mesh, seed=run.loop.seed)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                               log=lambda message: None)
    try:
        restored = checkpoints.restore_latest(abstract)
    finally:
        checkpoints.close()
    if restored is None:
        raise ValueError(f"no checkpoint in {workdir}/checkpoints")
    jax.block_until_ready(jax.tree.leaves(restored.state))
    return restored.step


WAYS: dict[str, Callable[[str], int]] = {
    "kexue.load (parameters only)": _load,
    "experiments.evaluate's build + full restore": _build_and_restore,
}


def measure(workdir: str, repeats: int) -> dict[str, Any]:
    """`{way: {"first_s", "median_s", "seconds", "step"}}`, the ways interleaved."""
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    steps: dict[str, int] = {}
    for _ in range(repeats):
        for name, way in WAYS.items():
            start = time.perf_counter()
            steps[name] = way(workdir)
            seconds[name].append(time.perf_counter() - start)
    out = {}
    for name, values in seconds.items():
        rest = sorted(values[1:])
        out[name] = {"first_s": values[0],
                     "median_s": rest[len(rest) // 2] if rest else None,
                     "seconds": values, "step": steps[name]}
    return out


def markdown(record: dict[str, Any]) -> str:
    lines = [f"Loading `{record['workdir']}` ({record['parameters']:,} parameters), "
             f"{record['date']}, {record['machine']}", "",
             "| way | first call (s) | median of the later calls (s) |", "|---|---|---|"]
    for name, row in record["ways"].items():
        median = "—" if row["median_s"] is None else f"{row['median_s']:.2f}"
        lines.append(f"| {name} | {row['first_s']:.2f} | {median} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run directory of experiments.train")
    parser.add_argument("--repeats", type=int, default=3, help="calls of each way (>= 1)")
    parser.add_argument("--out", default=None, help="write the numbers here (JSON)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive int; got {args.repeats}")
    if not os.path.isdir(args.workdir):
        parser.error(f"--workdir: {args.workdir!r} is not a directory")
    import jax
    from flax import nnx

    import kexue
    from kexue.train import machine_description, today

    ways = measure(args.workdir, args.repeats)
    parameters = sum(int(leaf.size) for leaf in jax.tree.leaves(
        nnx.state(kexue.load(args.workdir).model, nnx.Param)))
    record = {"workdir": os.path.relpath(args.workdir), "parameters": parameters,
              "repeats": args.repeats, "ways": ways, "date": today(),
              "machine": machine_description(),
              "command": "python -m experiments.time_load --workdir "
                         f"{os.path.relpath(args.workdir)} --repeats {args.repeats}"}
    print(markdown(record), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
            file.write("\n")
    return record


if __name__ == "__main__":
    main()
