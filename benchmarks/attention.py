"""Dense vs blocked attention: compiled peak memory and forward+backward time; how long a
sequence the `lm_stdlib` model can train on in a fixed memory budget.

    python -m benchmarks.attention --out benchmarks/results/attention.json   # ~15 min, CPU
    python -m benchmarks.attention --smoke --out /tmp/attention.json          # seconds
    python -m benchmarks.attention --block-sizes --out benchmarks/results/attention_blocks.json
    python -m benchmarks.attention --markdown benchmarks/results/attention.json

1. **Attention alone**, at the `lm_stdlib` shape (batch 1, 4 heads of 64, float32, the
   entropy-invariant scale) for n = 32 … 16384, causal and bidirectional: the peak
   memory of the jitted value-and-gradient w.r.t. `q, k, v` from XLA's compiled
   `memory_analysis()` (arguments + outputs + temporaries − aliased), and its median
   time. `ops.dot_product_attention(..., implementation="xla")` is the dense path,
   ``"blocked"`` the blocked one with its default block sizes; both get the mask as an
   `ops.AttentionMask`, as the models pass it. At each n the four variants are timed
   interleaved in one loop; a dense variant whose compiled peak exceeds `--run-budget`
   is compiled (for its memory) but not run.
2. **Longest trainable length** of the `configs/lm_stdlib.py` model at batch 1: lengths
   doubled from 512 until the compiled AdamW step (`benchmarks.lm.max_length`: temp +
   arguments, CPU memory scheduler) exceeds the budget (4 GiB), dense vs blocked; then
   one real step of the blocked model at 16384 tokens is run.
3. **Train step** of that model (the product `make_train_step`, AdamW), dense vs
   blocked, at its default shape (batch 16 x 128) and at 4 x 512 and 1 x 2048: the
   default `model.attention_implementation` on CPU is chosen from 1 and 3.

`--block-sizes` instead times the blocked path alone for the `BLOCK_SIZES` at n = 2048
(how its default blocks were chosen). The results are written as JSON (`--out`);
`--markdown PATH` prints the tables of a JSON file, which is how benchmarks/RESULTS.md
is produced.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import lm
from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import models, ops
from kexue.ops import blocked_attention

GIB = 2**30
MIB = 2**20
IMPLEMENTATIONS = {"dense": "xla", "blocked": "blocked"}
MASKS = ("causal", "bidirectional")

#: `(block_q, block_k)` pairs timed by `--block-sizes`.
BLOCK_SIZES = ((128, 128), (256, 128), (256, 256), (512, 256), (512, 512))
FULL = {"lengths": (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), "batch": 1,
        "heads": 4, "head_dim": 64, "repeats": 3, "run_budget": 6 * GIB,
        "block_length": 2048, "block_repeats": 9,
        "lm": {"start": 512, "limit": 65536, "budget": 4 * GIB, "proof_length": 16384,
               "steps": ((16, 128), (4, 512), (1, 2048))}}
SMOKE = {"lengths": (64, 128), "batch": 1, "heads": 2, "head_dim": 8, "repeats": 1,
         "run_budget": GIB, "block_length": 100, "block_repeats": 1,
         "lm": {"start": 32, "limit": 64, "budget": GIB, "proof_length": 32,
                "steps": ((2, 32),),
                "model": dict(width=32, num_layers=1, num_heads=2, mlp_dim=64,
                              vocab_size=64, tie_embeddings=True,
                              attention_scale="entropy_invariant")}}


def attention_mask(kind: str) -> ops.AttentionMask:
    return ops.AttentionMask(causal=kind == "causal")


def compiled_gradient(n: int, mask: str, implementation: str, *, batch: int, heads: int,
                      head_dim: int, blocks: tuple[int, int] | None = None):
    """The compiled value-and-gradient w.r.t. `(q, k, v)` of `Σ attention(q, k, v)`
    (`blocks`: `(block_q, block_k)` of the blocked path; None: its defaults)."""
    shape = jax.ShapeDtypeStruct((batch, n, heads, head_dim), jnp.float32)
    block_q, block_k = (None, None) if blocks is None else blocks

    def loss(q, k, v):
        out = ops.dot_product_attention(q, k, v, mask=attention_mask(mask),
                                        scale="entropy_invariant",
                                        implementation=implementation,
                                        block_q=block_q, block_k=block_k)
        return jnp.sum(out)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return step.lower(shape, shape, shape).compile()


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries − aliased bytes of a compiled function."""
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def attention_rows(lengths: Sequence[int], *, batch: int, heads: int, head_dim: int,
                   repeats: int, run_budget: int) -> list[dict[str, Any]]:
    """One dict per (n, mask): compiled peak bytes and median seconds of both paths
    (`None` seconds: dense not run because its peak exceeds `run_budget`)."""
    rows = []
    for n in lengths:
        key = jax.random.key(n)
        q, k, v = (jax.random.normal(subkey, (batch, n, heads, head_dim), jnp.float32)
                   for subkey in jax.random.split(key, 3))
        found: dict[tuple[str, str], int] = {}
        runners: list[Callable[[], object]] = []
        timed: list[tuple[str, str]] = []
        for mask in MASKS:
            for name, implementation in IMPLEMENTATIONS.items():
                compiled = compiled_gradient(n, mask, implementation, batch=batch,
                                             heads=heads, head_dim=head_dim)
                found[mask, name] = peak_bytes(compiled)
                if found[mask, name] <= run_budget:
                    runners.append(lambda c=compiled, q=q, k=k, v=v: c(q, k, v))
                    timed.append((mask, name))
        times = dict(zip(timed, interleaved_median_times(runners, repeats=repeats, warmup=1),
                         strict=True))
        for mask in MASKS:
            rows.append({"n": n, "mask": mask,
                         **{f"{name}_peak_bytes": found[mask, name] for name in IMPLEMENTATIONS},
                         **{f"{name}_seconds": times.get((mask, name))
                            for name in IMPLEMENTATIONS}})
        print(f"n={n}: " + ", ".join(f"{mask} {name} {found[mask, name] / MIB:.1f} MiB "
                                     f"{times.get((mask, name), float('nan')) * 1e3:.0f} ms"
                                     for mask in MASKS for name in IMPLEMENTATIONS),
              file=sys.stderr, flush=True)
    return rows


def block_size_rows(n: int, sizes: Sequence[tuple[int, int]], *, batch: int, heads: int,
                    head_dim: int, repeats: int) -> list[dict[str, Any]]:
    """Blocked value-and-gradient time and peak per `(block_q, block_k)` at length `n`,
    causal and bidirectional, all interleaved in one loop."""
    key = jax.random.key(n)
    q, k, v = (jax.random.normal(subkey, (batch, n, heads, head_dim), jnp.float32)
               for subkey in jax.random.split(key, 3))
    cases = [(mask, blocks) for blocks in sizes for mask in MASKS]
    compiled = [compiled_gradient(n, mask, "blocked", batch=batch, heads=heads,
                                  head_dim=head_dim, blocks=blocks) for mask, blocks in cases]
    times = interleaved_median_times([lambda c=c: c(q, k, v) for c in compiled],
                                     repeats=repeats, warmup=1)
    return [{"n": n, "mask": mask, "block_q": blocks[0], "block_k": blocks[1],
             "peak_bytes": peak_bytes(c), "seconds": seconds}
            for (mask, blocks), c, seconds in zip(cases, compiled, times, strict=True)]


def block_markdown(results: dict[str, Any]) -> str:
    """The table of a `--block-sizes` results dict."""
    shape = results["shape"]
    rows = results["blocks"]
    best = {mask: min(row["seconds"] for row in rows if row["mask"] == mask) for mask in MASKS}
    table = [[f"{row['block_q']} x {row['block_k']}", row["mask"],
              f"{row['peak_bytes'] / MIB:,.1f}", milliseconds(row["seconds"]),
              f"{row['seconds'] / best[row['mask']]:.2f}x"] for row in rows]
    return "\n".join([
        f"Blocked attention block sizes ({results['date']}; {results['machine']}). Command: "
        f"`{results['command']}`.", "",
        f"Value and gradient at n = {rows[0]['n']}, batch {shape['batch']}, "
        f"{shape['heads']} heads of {shape['head_dim']}, float32, entropy-invariant scale; "
        f"median of {shape['repeats']} interleaved runs.", "",
        markdown_table(["block_q x block_k", "mask", "peak MiB", "ms", "vs fastest"], table)])


def lm_longest(model: dict[str, Any], *, start: int, limit: int, budget: int,
               proof_length: int) -> dict[str, Any]:
    """Longest power-of-two length (from `start`, up to `limit`) whose compiled AdamW step
    of the causal LM fits `budget` at batch 1, per implementation; one real blocked step."""
    options = lm.remat_options()
    result: dict[str, Any] = {"batch": 1, "budget_bytes": budget, "start": start,
                              "limit": limit}
    configs = {}
    for name, implementation in IMPLEMENTATIONS.items():
        configs[name] = models.ModelSpec.from_settings(
            {"name": "causal_lm", **model, "attention_implementation": implementation})
        length, peak, tried = lm.max_length(configs[name], 1, start, limit, budget, options)
        result[name] = {"length": length, "peak_bytes": peak,
                        "tried_lengths": [n for n, _ in tried],
                        "tried_bytes": [b for _, b in tried]}
        print(f"lm {name}: longest {length} ({peak / GIB:.2f} GiB)", file=sys.stderr,
              flush=True)
    seconds, loss = lm.run_one_step(configs["blocked"], 1, proof_length, options)
    result["proof"] = {"length": proof_length, "seconds": seconds, "loss": loss}
    return result


def lm_step_rows(model: dict[str, Any], shapes: Sequence[tuple[int, int]], *,
                 repeats: int) -> list[dict[str, Any]]:
    """Product train-step time (`benchmarks.lm.train_stepper`, AdamW) of the causal LM,
    dense vs blocked, per `(batch, length)`; all steps interleaved in one loop."""
    keys = [(batch, length, name) for batch, length in shapes for name in IMPLEMENTATIONS]
    runners = [lm.train_stepper(lm.LMCase(name, {**model, "attention_implementation":
                                                  IMPLEMENTATIONS[name]}, batch, length),
                                "adamw")
               for batch, length, name in keys]
    times = interleaved_median_times(runners, repeats=repeats, warmup=1)
    return [{"batch": batch, "length": length, "implementation": name, "seconds": seconds}
            for (batch, length, name), seconds in zip(keys, times, strict=True)]


def crossover(rows: Sequence[dict[str, Any]]) -> int | None:
    """Smallest measured n from which blocked is at least as fast as dense for every
    mask and every longer length where dense was run (None: never)."""
    lengths = sorted({row["n"] for row in rows})
    best = None
    for n in reversed(lengths):
        pairs = [row for row in rows if row["n"] == n and row["dense_seconds"] is not None]
        if all(row["blocked_seconds"] <= row["dense_seconds"] for row in pairs):
            best = n
        else:
            break
    return best


def growth_exponent(rows: Sequence[dict[str, Any]], name: str, mask: str) -> float:
    """`log(peak(n_max) / peak(n_min)) / log(n_max / n_min)`: 1 = linear, 2 = quadratic."""
    picked = sorted((row["n"], row[f"{name}_peak_bytes"]) for row in rows if row["mask"] == mask)
    (n0, b0), (n1, b1) = picked[0], picked[-1]
    return math.log(b1 / b0) / math.log(n1 / n0)


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """`(goal, measured, met)` for the three goals of the blocked attention work."""
    rows = results["rows"]
    exponents = {mask: growth_exponent(rows, "blocked", mask) for mask in MASKS}
    dense_exponents = {mask: growth_exponent(rows, "dense", mask) for mask in MASKS}
    long_causal = [row for row in rows if row["mask"] == "causal" and row["n"] >= 4096
                   and row["dense_seconds"] is not None]
    ratios = [row["blocked_seconds"] / row["dense_seconds"] for row in long_causal]
    longest = results["lm"]["blocked"]["length"]
    return [
        ("peak memory linear in n",
         "blocked exponent " + ", ".join(f"{m} {e:.2f}" for m, e in exponents.items())
         + " (dense " + ", ".join(f"{m} {e:.2f}" for m, e in dense_exponents.items()) + ")",
         all(e <= 1.15 for e in exponents.values())),
        ("causal blocked ≤ 0.6x dense time at n ≥ 4096",
         ", ".join(f"n={row['n']}: {r:.2f}x" for row, r in zip(long_causal, ratios, strict=True))
         or "dense not run at n ≥ 4096",
         bool(ratios) and all(r <= 0.6 for r in ratios)),
        ("lm_stdlib trains ≥ 16384 tokens at batch 1 in the budget",
         f"blocked {longest}, dense {results['lm']['dense']['length']}", longest >= 16384),
    ]


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of a results dict (as written to `--out`)."""
    shape = results["shape"]
    out = [f"Dense vs blocked attention ({results['date']}; {results['machine']}). "
           f"Command: `{results['command']}`.", "",
           f"Value and gradient w.r.t. q, k, v of `Σ attention`: batch {shape['batch']}, "
           f"{shape['heads']} heads of {shape['head_dim']}, float32, entropy-invariant scale; "
           f"blocked with blocks of {shape['block_q']} x {shape['block_k']}. Peak = compiled "
           f"arguments + outputs + temporaries; time = median of {shape['repeats']} "
           "interleaved runs (— : dense not run, its peak exceeds "
           f"{results['run_budget_bytes'] / GIB:.0f} GiB).", ""]
    rows = []
    for row in results["rows"]:
        dense_s, blocked_s = row["dense_seconds"], row["blocked_seconds"]
        rows.append([row["n"], row["mask"], f"{row['dense_peak_bytes'] / MIB:,.1f}",
                     f"{row['blocked_peak_bytes'] / MIB:,.1f}",
                     "—" if dense_s is None else milliseconds(dense_s),
                     milliseconds(blocked_s),
                     "—" if dense_s is None else f"{blocked_s / dense_s:.2f}x"])
    out.append(markdown_table(["n", "mask", "dense peak MiB", "blocked peak MiB",
                               "dense ms", "blocked ms", "blocked / dense time"], rows))
    first = crossover(results["rows"])
    out += ["", "Blocked is at least as fast as dense (both masks) from n = "
            f"{first if first is not None else '—'} on among the lengths measured.", ""]
    lm_result = results["lm"]
    out.append(f"Longest trainable length of the `lm_stdlib` model, batch 1, budget "
               f"{lm_result['budget_bytes'] / GIB:.0f} GiB of compiled step memory "
               f"(lengths doubled from {lm_result['start']} up to {lm_result['limit']}):")
    out.append("")
    out.append(markdown_table(
        ["attention", "longest length", "peak GiB at it", "peak GiB of each length tried"],
        [[name, lm_result[name]["length"], f"{lm_result[name]['peak_bytes'] / GIB:.2f}",
          ", ".join(f"{b / GIB:.2f}" for b in lm_result[name]["tried_bytes"])]
         for name in IMPLEMENTATIONS]))
    steps = results["lm_steps"]
    out += ["", "Train step of the `lm_stdlib` model (product `make_train_step`, AdamW), "
            "interleaved medians:", ""]
    step_rows = []
    for dense in (row for row in steps if row["implementation"] == "dense"):
        blocked = next(row for row in steps if row["implementation"] == "blocked"
                       and (row["batch"], row["length"]) == (dense["batch"], dense["length"]))
        step_rows.append([f"{dense['batch']} x {dense['length']}",
                          milliseconds(dense["seconds"]), milliseconds(blocked["seconds"]),
                          f"{blocked['seconds'] / dense['seconds']:.2f}x"])
    out.append(markdown_table(["batch x length", "dense ms", "blocked ms", "blocked / dense"],
                              step_rows))
    proof = lm_result["proof"]
    out += ["", f"One real blocked training step at length {proof['length']}: "
            f"{proof['seconds']:.1f} s, loss {proof['loss']:.3f}.", ""]
    out.append(markdown_table(["goal", "measured", "met"],
                              [[g, m, "yes" if ok else "**no**"] for g, m, ok in goals(results)]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--block-sizes", action="store_true",
                        help="only time the blocked path for several block sizes")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the tables of a results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            results = json.load(f)
        print(block_markdown(results) if "blocks" in results else markdown(results))
        return results
    size = SMOKE if args.smoke else FULL
    shape = {"batch": size["batch"], "heads": size["heads"], "head_dim": size["head_dim"],
             "dtype": "float32", "scale": "entropy_invariant", "repeats": size["repeats"],
             "block_q": blocked_attention.DEFAULT_BLOCK_Q,
             "block_k": blocked_attention.DEFAULT_BLOCK_K}
    command = "python -m benchmarks.attention" + (" --smoke" if args.smoke else "")
    if args.block_sizes:
        blocks = block_size_rows(size["block_length"], BLOCK_SIZES, batch=size["batch"],
                                 heads=size["heads"], head_dim=size["head_dim"],
                                 repeats=size["block_repeats"])
        results = {"date": today(), "machine": machine_description(),
                   "command": command + " --block-sizes",
                   "shape": {**shape, "repeats": size["block_repeats"]}, "blocks": blocks}
        print(block_markdown(results))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        return results
    model = size["lm"].get("model") or lm.lm_stdlib_model()[0]
    rows = attention_rows(size["lengths"], batch=size["batch"], heads=size["heads"],
                          head_dim=size["head_dim"], repeats=size["repeats"],
                          run_budget=size["run_budget"])
    lm_result = lm_longest(model, start=size["lm"]["start"], limit=size["lm"]["limit"],
                           budget=size["lm"]["budget"],
                           proof_length=size["lm"]["proof_length"])
    lm_steps = lm_step_rows(model, size["lm"]["steps"], repeats=size["repeats"])
    results = {
        "date": today(), "machine": machine_description(), "command": command,
        "shape": shape,
        "run_budget_bytes": size["run_budget"], "rows": rows, "lm": lm_result,
        "lm_steps": lm_steps,
        "numpy": np.__version__,
    }
    print(markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
