"""Speed and memory of the core ops, side by side with their baselines.

    python -m benchmarks.ops [--quick]

Prints three markdown tables:

1. RoPE throughput (GB/s, bytes read + written) next to a jitted copy of the same
   array: the copy is the memory-bandwidth ceiling for an elementwise op, so the
   ratio says how close RoPE gets to it (target on CPU: at least 60%). Both write a
   fresh output buffer, as a standalone op must; for arrays of 100+ MB the kernel's
   fresh pages cost as much as the loop on this CPU, which lowers both alike. Positions
   known at trace time (the default `arange(n)`) use a host-computed table; traced
   positions compute the table on the device, once per entry, before the rotation
   loop reads it.
2. Entropy-invariant vs standard attention time for the same inputs and mask, given as
   an `ops.AttentionMask` as the models pass it, with the default implementation
   (blocked on CPU at these lengths); target: under 5% overhead (the extra work is
   counting each query's visible keys, `O(n)`, and one per-query logit scale).
3. Peak memory of dense vs sparse ZLPR loss-and-gradient for a GlobalPointer head
   at n = 512 with 10 entity types, from XLA's compiled memory analysis
   (arguments + outputs + temporaries).

Timings interleave the compared functions in one loop and report medians, so the
ratios are robust to the machine's background load.
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import ops


def rope_table(quick: bool) -> str:
    shapes = [(4, 1024, 16, 64), (8, 2048, 16, 128)] if not quick else [(2, 512, 8, 64)]
    rows = []
    copy = jax.jit(jnp.copy)
    rope_default = jax.jit(ops.apply_rope, static_argnames="layout")
    rope_cached = jax.jit(lambda x, sc: ops.apply_rope(x, sin_cos=sc))
    rope_traced = jax.jit(ops.apply_rope)
    for shape in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            x = jax.random.normal(jax.random.key(0), shape, dtype)
            positions = jnp.arange(shape[1])
            sin_cos = ops.rope_sin_cos(positions, shape[-1])
            fns = [
                partial(copy, x),
                partial(rope_default, x, layout="interleaved"),
                partial(rope_default, x, layout="half"),
                partial(rope_cached, x, sin_cos),
                partial(rope_traced, x, positions),
            ]
            times = interleaved_median_times(fns, repeats=5 if quick else 25)
            moved = 2 * x.size * x.dtype.itemsize / 1e9
            gbps = [moved / t for t in times]
            rows.append(["x".join(map(str, shape)), jnp.dtype(dtype).name, f"{gbps[0]:.1f}"]
                        + [f"{g:.1f} ({g / gbps[0]:.0%})" for g in gbps[1:]])
    header = ["shape [b,n,h,d]", "dtype", "copy GB/s", "interleaved, default positions",
              "half, default positions", "interleaved, `sin_cos` argument",
              "interleaved, traced positions"]
    return markdown_table(header, rows)


def attention_table(quick: bool) -> str:
    configs = [(4, 512, 8, 64), (2, 1024, 8, 64)] if not quick else [(2, 256, 4, 32)]
    rows = []
    for b, n, h, d in configs:
        keys = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(keys[0], (b, n, h, d), jnp.float32)
        k = jax.random.normal(keys[1], (b, n, h, d), jnp.float32)
        v = jax.random.normal(keys[2], (b, n, h, d), jnp.float32)
        lengths = jax.random.randint(keys[3], (b,), n // 2, n + 1)
        valid = jnp.arange(n)[None, :] < lengths[:, None]
        for mask_name, mask in (("padding", ops.AttentionMask(valid=valid)),
                                ("padding+causal", ops.AttentionMask(valid=valid, causal=True))):
            attend = jax.jit(
                lambda q, k, v, m, scale: ops.dot_product_attention(q, k, v, mask=m, scale=scale),
                static_argnums=4)
            times = interleaved_median_times(
                [partial(attend, q, k, v, mask, "standard"),
                 partial(attend, q, k, v, mask, "entropy_invariant")],
                repeats=5 if quick else 20)
            rows.append([f"{b}x{n}x{h}x{d}", mask_name, f"{times[0] * 1e3:.2f}",
                         f"{times[1] * 1e3:.2f}", f"{times[1] / times[0] - 1:+.1%}"])
    header = ["q,k,v [b,n,h,d]", "mask", "standard ms", "entropy-invariant ms", "overhead"]
    return markdown_table(header, rows)


def _peak_bytes(fn, *args) -> int:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def zlpr_memory_table(quick: bool) -> str:
    batch, types, n = (2, 10, 128) if quick else (8, 10, 512)
    max_entities = 32
    rng = np.random.default_rng(0)
    logits = jax.ShapeDtypeStruct((batch, types * n * n), jnp.float32)
    dense_labels = jax.ShapeDtypeStruct((batch, types * n * n), jnp.float32)
    indices = jax.ShapeDtypeStruct((batch, max_entities), jnp.int32)

    def dense(s, y):
        return jax.value_and_grad(lambda s: ops.zlpr_loss(s, y).mean())(s)

    def sparse(s, idx):
        return jax.value_and_grad(lambda s: ops.sparse_zlpr_loss(s, idx).mean())(s)

    dense_bytes = _peak_bytes(dense, logits, dense_labels)
    sparse_bytes = _peak_bytes(sparse, logits, indices)
    logits_bytes = batch * types * n * n * 4

    # Equal values on one concrete draw, so the memory comparison is of equal work.
    s = jnp.asarray(rng.normal(size=(batch, types * n * n)), jnp.float32)
    idx = np.stack([rng.choice(types * n * n, max_entities, replace=False) for _ in range(batch)])
    y = np.zeros((batch, types * n * n), np.float32)
    np.put_along_axis(y, idx, 1.0, axis=-1)
    gap = float(jnp.max(jnp.abs(ops.zlpr_loss(s, jnp.asarray(y))
                                - ops.sparse_zlpr_loss(s, jnp.asarray(idx, jnp.int32)))))
    mib = 1024**2
    rows = [
        ["dense ZLPR (labels [b, types·n²])", f"{dense_bytes / mib:.1f}",
         f"{dense_bytes / logits_bytes:.2f}"],
        [f"sparse ZLPR (indices [b, {max_entities}])", f"{sparse_bytes / mib:.1f}",
         f"{sparse_bytes / logits_bytes:.2f}"],
    ]
    table = markdown_table(["loss + grad w.r.t. logits", "peak MiB", "× logits size"], rows)
    return (f"GlobalPointer head: batch {batch}, {types} types, n = {n} "
            f"(logits {logits_bytes / mib:.0f} MiB); max |dense − sparse| loss = {gap:.2e}\n\n"
            + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    args = parser.parse_args()
    print(f"# kexue.ops benchmark — {today()} — {machine_description()}\n")
    print("## RoPE throughput vs device copy\n")
    print(rope_table(args.quick), "\n")
    print("## Entropy-invariant vs standard attention\n")
    print(attention_table(args.quick), "\n")
    print("## Dense vs sparse ZLPR peak memory\n")
    print(zlpr_memory_table(args.quick))


if __name__ == "__main__":
    main()
