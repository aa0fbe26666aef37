"""GlobalPointer versus Efficient GlobalPointer: head parameters and step time.

    python -m benchmarks.heads            # n = 64 / 256 / 512
    python -m benchmarks.heads --quick    # tiny shapes

The head alone on given hidden states `h [b, n, D]`: GlobalPointer (kexue.fm/archives/
8373) projects `h` to `q, k` of `[types, d]` per token (`2·D·types·d` kernel weights)
and scores every span per type; Efficient GlobalPointer (archive 8877) shares one
`q, k` of width `d` and adds per-type start/end biases from `[q; k]` (`2·D·d +
2·2d·types` weights). Both are built from `kexue.models.Dense` and
`kexue.ops.global_pointer_logits` / `efficient_global_pointer_logits`, as in
`kexue.models.GlobalPointerNER`, and trained with the dense ZLPR loss
(`kexue.ops.zlpr_loss` over the upper-triangular spans). Time = jitted forward +
backward (loss and gradients w.r.t. the head parameters and `h`), the two heads
interleaved, median.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import models, ops

FULL = {"lengths": (64, 256, 512), "batch": 8, "width": 256, "types": 10, "head_dim": 64,
        "repeats": 7}
QUICK = {"lengths": (16, 32), "batch": 2, "width": 32, "types": 3, "head_dim": 8,
         "repeats": 2}
HEADER = ["n", "head", "params", "fwd+bwd (ms)", "efficient vs dense"]


class SpanHead(nnx.Module):
    """The span head of `GlobalPointerNER` alone: dense or efficient GlobalPointer."""

    def __init__(self, width: int, types: int, head_dim: int, *, efficient: bool,
                 rngs: nnx.Rngs):
        self.efficient = efficient
        if efficient:
            self.query = models.Dense(width, head_dim, in_axes=("embed",),
                                      out_axes=("head_dim",), rngs=rngs)
            self.key = models.Dense(width, head_dim, in_axes=("embed",),
                                    out_axes=("head_dim",), rngs=rngs)
            self.bias_start = models.Dense(2 * head_dim, types, in_axes=("head_dim",),
                                           out_axes=("types",), rngs=rngs)
            self.bias_end = models.Dense(2 * head_dim, types, in_axes=("head_dim",),
                                         out_axes=("types",), rngs=rngs)
        else:
            self.query = models.Dense(width, (types, head_dim), in_axes=("embed",),
                                      out_axes=("types", "head_dim"), rngs=rngs)
            self.key = models.Dense(width, (types, head_dim), in_axes=("embed",),
                                    out_axes=("types", "head_dim"), rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """Span logits `[b, types, n, n]` of hidden states `h [b, n, D]`."""
        q, k = self.query(h), self.key(h)
        if self.efficient:
            qk = jnp.concatenate([q, k], axis=-1)
            return ops.efficient_global_pointer_logits(q, k, self.bias_start(qk),
                                                       self.bias_end(qk))
        return ops.global_pointer_logits(q, k)


def head_step(head: SpanHead, n: int, batch: int, width: int, types: int):
    """A zero-argument jitted forward + backward of the head with the dense ZLPR loss."""
    graphdef, params = nnx.split(head)
    keys = jax.random.split(jax.random.key(n), 2)
    h = jax.random.normal(keys[0], (batch, n, width), jnp.float32)
    labels = (jax.random.uniform(keys[1], (batch, types, n, n)) < 0.01).astype(jnp.float32)
    upper = jnp.triu(jnp.ones((n, n), bool))  # spans with start <= end

    def loss(params, h):
        logits = nnx.merge(graphdef, params)(h)
        return jnp.mean(ops.zlpr_loss(logits, labels, where=upper, axis=(-2, -1)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: grad(params, h)


def head_rows(lengths: Sequence[int], *, batch: int, width: int, types: int, head_dim: int,
              repeats: int) -> list[list[str]]:
    """Rows of `HEADER`: per length, the dense and the efficient head."""
    rows = []
    for n in lengths:
        with nnx.use_eager_sharding(False):
            built = [SpanHead(width, types, head_dim, efficient=e, rngs=nnx.Rngs(0))
                     for e in (False, True)]
        times = interleaved_median_times([head_step(b, n, batch, width, types)
                                          for b in built], repeats=repeats, warmup=1)
        for head, seconds, name in zip(built, times, ("GlobalPointer", "Efficient GP"),
                                       strict=True):
            rows.append([str(n), name, f"{models.count_params(head):,}",
                         f"{seconds * 1e3:.2f}", f"{seconds / times[0]:.2f}x"])
    return rows


def describe(size: dict[str, Any]) -> str:
    return (f"### GlobalPointer heads: {size['types']} types, width {size['width']}, head "
            f"dim {size['head_dim']}, batch {size['batch']}; jitted forward + backward "
            f"with the dense ZLPR loss, interleaved medians of {size['repeats']}\n")


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    print(f"## GlobalPointer heads ({today()}; {machine_description()})\n")
    rows = head_rows(size["lengths"], batch=size["batch"], width=size["width"],
                     types=size["types"], head_dim=size["head_dim"], repeats=size["repeats"])
    print(describe(size))
    print(markdown_table(HEADER, rows))
    return rows


if __name__ == "__main__":
    main()
