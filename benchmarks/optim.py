"""Optimizer step time and state memory: AdamW versus Amos and Amos-style chains.

    python -m benchmarks.optim        # ~110M-parameter pytree -> benchmarks/results/optim.json
    python -m benchmarks.optim --quick --out /tmp/optim.json    # a tiny pytree, seconds
    python -m benchmarks.optim --markdown benchmarks/results/optim.json   # its tables

The parameters mimic a 12-layer, width-768 transformer with a 32k vocabulary (token
embedding; per layer a fused QKV kernel, attention output, MLP up/down kernels, their
biases and two LayerNorms; a final norm), in float32. Each optimizer's step — update
and `optax.apply_updates`, jitted with params and state donated — runs on the same
random gradients, compiled twice: with XLA's defaults and with the options
`kexue.train` compiles its train step with (`kexue.train.cpu_compiler_options`; on
CPU only, elsewhere there is one setting). All optimizer × setting steps are
interleaved in one loop and the median kept (`kexue.train.interleaved_median_times`),
and each time is reported against AdamW's faster setting, so every optimizer is
compared with AdamW at its best. State bytes count every array in the optimizer
state. Targets (issue 3): Amos within 1.2x AdamW's time; factored Amos slot memory at
most 0.55x AdamW's.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import optim
from kexue.train import cpu_compiler_options

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "optim.json")
BASELINE = "optax.adamw"

FULL = {"layers": 12, "width": 768, "vocab": 32_000, "repeats": 10}
QUICK = {"layers": 2, "width": 32, "vocab": 100, "repeats": 3}


def transformer_shapes(layers: int, width: int, vocab: int) -> dict[str, Any]:
    """Parameter shapes of a pre-LN transformer (BERT/GPT-2 base-like at 12 x 768 x 32k)."""
    def layer() -> dict[str, Any]:
        return {
            "attention": {"qkv": {"kernel": (width, 3 * width), "bias": (3 * width,)},
                          "out": {"kernel": (width, width), "bias": (width,)}},
            "mlp": {"up": {"kernel": (width, 4 * width), "bias": (4 * width,)},
                    "down": {"kernel": (4 * width, width), "bias": (width,)}},
            "norm1": {"scale": (width,), "bias": (width,)},
            "norm2": {"scale": (width,), "bias": (width,)},
        }

    return {
        "embedding": (vocab, width),
        **{f"layer_{i:02d}": layer() for i in range(layers)},
        "final_norm": {"scale": (width,), "bias": (width,)},
    }


def _is_shape(node: Any) -> bool:
    return isinstance(node, tuple) and all(isinstance(d, int) for d in node)


def make_params(shapes: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1/width), biases 0, norm scales 1."""
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    paths = list(optim.parameter_paths(jax.tree.unflatten(
        treedef, [np.zeros(0)] * len(leaves))))
    keys = jax.random.split(key, len(leaves))
    arrays = []
    for path, shape, k in zip(paths, leaves, keys, strict=True):
        if path.endswith("scale"):
            arrays.append(jnp.ones(shape))
        elif path.endswith("bias"):
            arrays.append(jnp.zeros(shape))
        else:
            arrays.append(jax.random.normal(k, shape) / np.sqrt(shape[0] if len(shape) > 1
                                                                 and "embedding" not in path
                                                                 else shape[-1]))
    return jax.tree.unflatten(treedef, arrays)


def optimizers(params: Any) -> dict[str, optax.GradientTransformation]:
    eta_fn = optim.eta_fn_from_init(params)
    return {
        "optax.adamw": optax.adamw(1e-3, weight_decay=0.01),
        "amos": optim.amos(0.01, eta_fn),
        "amos (factored)": optim.amos(0.01, eta_fn, optim.reduce_largest_axes()),
        "amos_style (adam)": optim.amos_style(1e-2, direction="adam", sigma_fn=eta_fn,
                                              half_life=10_000),
        "amos_style (factored)": optim.amos_style(1e-2, direction="factored",
                                                  sigma_fn=eta_fn, half_life=10_000),
    }


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "dtype"))


def make_stepper(tx: optax.GradientTransformation, params: Any, grads: Any,
                 compiler_options: dict[str, Any] | None = None,
                 ) -> tuple[Callable[[], Any], int, int]:
    """A zero-argument function doing one donated, jitted step; the state's bytes; and
    the number of full-buffer `copy` instructions XLA put in the compiled step (each
    is an extra read and write of a slot that the donated update could not do in
    place)."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
    own_params = jax.tree.map(jnp.copy, params)
    state = jax.jit(tx.init)(own_params)
    hlo = jitted.lower(own_params, state, grads).compile().as_text()
    copies = hlo[hlo.index("ENTRY"):].count(" copy(")
    carry = [own_params, state]

    def run() -> Any:
        carry[0], carry[1] = jitted(carry[0], carry[1], grads)
        return carry[0]

    return run, tree_bytes(state), copies


def compiler_settings() -> dict[str, dict[str, Any] | None]:
    """Setting name -> `compiler_options`: XLA's defaults, and on CPU the options of
    `kexue.train`'s train step (for a one-device mesh)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    settings: dict[str, dict[str, Any] | None] = {"XLA defaults": None}
    options = cpu_compiler_options(mesh)
    if options is not None:
        settings["kexue.train CPU options"] = options
    return settings


def measure(size: dict[str, int]) -> dict[str, Any]:
    """Times every optimizer under every compiler setting in one interleaved loop."""
    params = make_params(transformer_shapes(size["layers"], size["width"], size["vocab"]),
                         jax.random.key(0))
    grads = jax.tree.map(lambda p, k: 1e-3 * jax.random.normal(k, p.shape, p.dtype), params,
                         jax.tree.unflatten(jax.tree.structure(params), list(jax.random.split(
                             jax.random.key(1), len(jax.tree.leaves(params))))))
    settings = compiler_settings()
    rows, runners = [], []
    for setting, options in settings.items():
        for name, tx in optimizers(params).items():
            run, nbytes, ncopies = make_stepper(tx, params, grads, options)
            runners.append(run)
            rows.append({"optimizer": name, "setting": setting, "state_bytes": nbytes,
                         "slot_copies": ncopies})
    times = interleaved_median_times(runners, repeats=size["repeats"])
    del runners
    for row, seconds in zip(rows, times, strict=True):
        row["step_seconds"] = seconds
    baseline = min((row for row in rows if row["optimizer"] == BASELINE),
                   key=lambda row: row["step_seconds"])
    for row in rows:
        row["time_vs_best_adamw"] = row["step_seconds"] / baseline["step_seconds"]
        row["state_vs_adamw"] = row["state_bytes"] / baseline["state_bytes"]
    return {
        "date": today(), "machine": machine_description(),
        "size": dict(size),
        "num_params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
        "param_bytes": tree_bytes(params), "tensors": len(jax.tree.leaves(params)),
        "settings": {name: options for name, options in settings.items()},
        "baseline": {"optimizer": BASELINE, "setting": baseline["setting"]},
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    """The table of a results record (one row per optimizer and compiler setting)."""
    size, base = results["size"], results["baseline"]
    settings = ", ".join(f"{name}: `{options}`" if options else f"{name}: none"
                         for name, options in results["settings"].items())
    lines = [f"Optimizer step ({results['date']}; {results['machine']}). "
             f"{size['layers']} layers, width {size['width']}, vocab {size['vocab']}: "
             f"{results['num_params']:,} float32 parameters "
             f"({results['param_bytes'] / 2**20:.1f} MiB), {results['tensors']} tensors. "
             "Step = update + apply_updates, jitted, params and state donated; every "
             "optimizer under every compiler setting in one interleaved loop, median of "
             f"{size['repeats']} repeats. Compiler options per setting: {settings}. "
             f"Times are relative to {base['optimizer']} at its faster setting "
             f"({base['setting']}).", ""]
    order = list(dict.fromkeys(row["optimizer"] for row in results["rows"]))
    table = [[row["optimizer"], row["setting"], f"{1e3 * row['step_seconds']:.1f}",
              f"{row['time_vs_best_adamw']:.2f}x", f"{row['state_bytes'] / 2**20:.1f}",
              f"{row['state_vs_adamw']:.3f}x", str(row["slot_copies"])]
             for row in sorted(results["rows"], key=lambda r: order.index(r["optimizer"]))]
    lines.append(markdown_table(["optimizer", "compiler setting", "step (ms)",
                                 "time vs best AdamW", "state (MiB)", "state vs AdamW",
                                 "slot copies in compiled step"], table))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pytree, few repeats")
    parser.add_argument("--out", help="where the JSON goes (default: "
                        "benchmarks/results/optim.json for the full size, none for --quick)")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as f:
            results = json.load(f)
        print(markdown(results))
        return results
    results = measure(QUICK if args.quick else FULL)
    results["command"] = "python -m benchmarks.optim" + (" --quick" if args.quick else "")
    print(markdown(results))
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return results


if __name__ == "__main__":
    main()
