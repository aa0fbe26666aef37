"""Optimizer step time and state memory: AdamW versus Amos and Amos-style chains.

    python -m benchmarks.optim            # ~110M-parameter transformer-shaped pytree
    python -m benchmarks.optim --quick    # a tiny pytree, a few seconds

The parameters mimic a 12-layer, width-768 transformer with a 32k vocabulary (token
embedding; per layer a fused QKV kernel, attention output, MLP up/down kernels, their
biases and two LayerNorms; a final norm), in float32. Each optimizer's step — update
and `optax.apply_updates`, jitted with params and state donated — runs on the same
random gradients; the steps of all optimizers are interleaved and the median kept
(`benchmarks.common.interleaved_median_times`). State bytes count every array in the
optimizer state. Targets (issue 3): Amos within 1.2x AdamW's time; factored Amos slot
memory at most 0.55x AdamW's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import optim

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pytree, few repeats")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL

    params = make_params(transformer_shapes(size["layers"], size["width"], size["vocab"]),
                         jax.random.key(0))
    grads = jax.tree.map(lambda p, k: 1e-3 * jax.random.normal(k, p.shape, p.dtype), params,
                         jax.tree.unflatten(jax.tree.structure(params), list(jax.random.split(
                             jax.random.key(1), len(jax.tree.leaves(params))))))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    print(f"## Optimizer step ({today()}; {machine_description()})\n")
    print(f"{size['layers']} layers, width {size['width']}, vocab {size['vocab']}: "
          f"{num_params:,} float32 parameters ({tree_bytes(params) / 2**20:.1f} MiB), "
          f"{len(jax.tree.leaves(params))} tensors. Step = update + apply_updates, jitted, "
          f"params and state donated; median of {size['repeats']} interleaved repeats.")
    modes = {"XLA defaults": None}
    if jax.default_backend() == "cpu":
        modes["`compiler_options=optim.CPU_COMPILER_OPTIONS`"] = optim.CPU_COMPILER_OPTIONS
    for mode, options in modes.items():
        names, runners, state_bytes, copies = [], [], [], []
        for name, tx in optimizers(params).items():
            run, nbytes, ncopies = make_stepper(tx, params, grads, options)
            names.append(name)
            runners.append(run)
            state_bytes.append(nbytes)
            copies.append(ncopies)
        times = interleaved_median_times(runners, repeats=size["repeats"])
        del runners
        base_time, base_bytes = times[0], state_bytes[0]
        rows = [
            [name, f"{t * 1e3:.1f}", f"{t / base_time:.2f}x", f"{b / 2**20:.1f}",
             f"{b / base_bytes:.3f}x", str(c)]
            for name, t, b, c in zip(names, times, state_bytes, copies, strict=True)
        ]
        print(f"\n### Compiled with {mode}\n")
        print(markdown_table(["optimizer", "step (ms)", "time vs adamw", "state (MiB)",
                              "state vs adamw", "slot copies in compiled step"], rows))


if __name__ == "__main__":
    main()
