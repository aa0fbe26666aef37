"""The ``correctness`` part of `benchmarks.accelerator`: kexue on the device against float64.

Sections, in order:

1. **Environment**: versions of the packages kexue needs, and whether the modules
   that need the carried wheels (`kexue.data`: TFDS, Grain, array_record;
   `ml_collections`; `tensorboardX`) import.
2. **Ops**: each `kexue.ops` function (and `kexue.models.cross_entropy`) jitted on the
   default device (the calls of one case — RoPE, attention, GlobalPointer, losses,
   distances — in one program), float32 and bfloat16 inputs, against the float64 NumPy
   reference of
   `benchmarks.references` evaluated on the same (rounded) inputs on the host. Error =
   `max |out − ref| / max |ref|` over the entries that exist (GlobalPointer: the valid
   spans; the others must be large negative). float32 runs at
   `jax.default_matmul_precision("highest")` (otherwise GPUs use TF32 for float32
   matmuls); tolerances in `TOLERANCE`.
3. **Attention implementations**: `ops.dot_product_attention` with every
   implementation (`"xla"`; `"cudnn"` on GPU, bf16 only; any other that
   `kexue.models.config.ATTENTION_IMPLEMENTATIONS` accepts, e.g. a blocked one, on
   every backend) on the standard and entropy-invariant scales, padding, causal and
   grouped-query heads: the forward against the reference, the gradient's directional
   derivative against a float64 central difference of the reference, and each
   non-XLA implementation's output and gradients against XLA's in the same dtype.
4. **Models**: for the causal LM, RoFormer MLM (entropy-invariant attention),
   GlobalPointer NER and the multilabel classifier, one `kexue.train.make_train_step`
   step with bf16 compute (cuDNN attention on GPU) against one in float32, from the
   same parameters and batch: the loss, and the gradient (the step is SGD at rate 1,
   so the parameter change is the gradient); the bf16 step must be finite.
5. **Checkpoint**: the bf16 causal LM's train state after its step, written on the
   device with `kexue.train.Checkpointer` and restored onto a CPU mesh
   (`jax.devices("cpu")`), every leaf bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import references as ref
from benchmarks.accelerator import PartReport, Section
from kexue import models, ops, parallel, tasks, train
from kexue.models.config import ATTENTION_IMPLEMENTATIONS

#: Largest accepted `max |out − ref| / max |ref|` per input dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
#: Gradient directional derivatives: `|dd − dd_ref| / Σ|g·u|` per dtype.
GRAD_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
#: Models: relative loss error and relative L2 gradient error of bf16 against float32.
MODEL_LOSS_TOLERANCE = 1e-2
MODEL_GRAD_TOLERANCE = 5e-2
DTYPES = ("float32", "bfloat16")
#: Implementations that run only on NVIDIA GPUs, and only in these dtypes.
GPU_ONLY = {"cudnn": ("bfloat16",)}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "ml-collections", "grain", "array-record", "tensorflow-datasets", "tensorboardX",
            "protobuf", "pyarrow", "etils", "importlib-resources", "torch", "transformers")
IMPORTS = ("kexue.data", "kexue.train", "ml_collections", "tensorboardX", "grain",
           "array_record", "tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int
    n: int
    heads: int
    kv_heads: int
    head_dim: int
    types: int
    classes: int
    dist_dim: int
    model_width: int
    model_layers: int
    model_heads: int
    vocab: int


FULL = Sizes(batch=2, n=128, heads=8, kv_heads=2, head_dim=64, types=4, classes=1000,
             dist_dim=16, model_width=128, model_layers=2, model_heads=4, vocab=512)
SMOKE = Sizes(batch=2, n=16, heads=4, kv_heads=2, head_dim=16, types=3, classes=40,
              dist_dim=4, model_width=32, model_layers=1, model_heads=2, vocab=64)


def run(report: PartReport) -> None:
    sizes = SMOKE if report.smoke else FULL
    rng = np.random.default_rng(int(time.time_ns() % 2**63))
    with report.section("environment", "Packages and imports") as section:
        environment_section(section)
    with report.section("ops", "kexue.ops against float64 references") as section:
        ops_section(section, rng, sizes)
    with report.section("attention", "Attention implementations") as section:
        attention_section(section, rng, sizes)
    states: dict[str, Any] = {}
    with report.section("models", "One bf16 train step of each model against float32") as section:
        states = models_section(section, rng, sizes)
    with report.section("checkpoint", "Checkpoint written on the device, restored on CPU") as s:
        name = next(iter(states), None)
        checkpoint_section(s, None if name is None else (name, *states[name]))


# ----------------------------------------------------------------------------- environment


def environment_section(section: Section) -> None:
    rows = []
    for name in PACKAGES:
        try:
            rows.append([name, metadata.version(name)])
        except metadata.PackageNotFoundError:
            rows.append([name, "absent"])
    section.table(["package", "version"], rows, title="Installed versions")
    section.data["versions"] = dict(rows)
    results = []
    for module in IMPORTS:
        try:
            importlib.import_module(module)
            results.append([module, "ok"])
        except Exception as error:  # recorded per module: the table shows every failure
            results.append([module, f"{type(error).__name__}: {str(error)[:200]}"])
        section.check(f"import {module}", results[-1][1] == "ok")
    section.table(["module", "import"], results, title="Imports kexue needs")


# ----------------------------------------------------------------------------- helpers


def on_device(x: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(x, jnp.float32).astype(dtype)


def host64(x: jax.Array) -> np.ndarray:
    """The values a device array holds, as float64 on the host."""
    return np.asarray(jax.device_get(jnp.asarray(x).astype(jnp.float32)), np.float64)


def normalized_error(out: Any, expected: np.ndarray, where: np.ndarray | None = None) -> float:
    """`max |out − expected| / max |expected|` over `where` (inf if `out` is not finite)."""
    got = host64(out)
    if where is not None:
        got, expected = got[where], expected[where]
    if not np.all(np.isfinite(got)):
        return math.inf
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return float(np.max(np.abs(got - expected), initial=0.0)) / scale


def random_valid(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """`[batch, n]` token validity: row 0 full, the others padded at the end."""
    lengths = [n, *rng.integers(max(1, n // 2), n, size=batch - 1)]
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def spd(rng: np.random.Generator, batch: int, d: int) -> np.ndarray:
    """Well-conditioned symmetric positive-definite `[batch, d, d]` covariances."""
    a = rng.standard_normal((batch, d, d)) / math.sqrt(d)
    return a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(d)


def precision_for(dtype: str):
    """float32 at full matmul precision (GPUs default to TF32); bf16 as it is."""
    return jax.default_matmul_precision("highest" if dtype == "float32" else "default")


# ----------------------------------------------------------------------------- ops


@dataclasses.dataclass(frozen=True)
class OpCheck:
    """One op call to check: `fn(*args)` on the device against `expected` (float64),
    over the entries `where` (None: all)."""

    name: str
    fn: Callable[..., jax.Array]
    args: tuple[Any, ...]
    expected: np.ndarray
    where: np.ndarray | None = None


#: `(rng, dtype, sizes) -> checks`; the checks of one case run as one jitted program.
OpCase = Callable[[np.random.Generator, str, Sizes], list[OpCheck]]


def rope_case(rng, dtype, s):
    x = on_device(rng.standard_normal((s.batch, s.n, s.heads, s.head_dim)), dtype)
    positions = jnp.asarray(rng.uniform(0, 4 * s.n, (s.batch, s.n)), jnp.float32)
    rotary = s.head_dim // 2
    checks = [OpCheck(f"apply_rope ({layout}, float positions, partial)",
                      functools.partial(ops.apply_rope, layout=layout, rotary_dim=rotary),
                      (x, positions), ref.rope(host64(x), host64(positions), layout=layout,
                                               rotary_dim=rotary))
              for layout in ("interleaved", "half")]
    grid = rng.integers(0, 16, (s.batch, s.n, 2))
    checks.append(OpCheck("apply_rope_nd (2 axes, half)",
                          functools.partial(ops.apply_rope_nd, layout="half"),
                          (x, jnp.asarray(grid)), ref.rope_nd(host64(x), grid, layout="half")))
    angles = ref.rope_angles(host64(positions), s.head_dim)
    for index, (part, fn) in enumerate((("sin", np.sin), ("cos", np.cos))):
        checks.append(OpCheck(
            f"rope_sin_cos ({part})",
            lambda p, index=index: ops.rope_sin_cos(p, rotary_dim=s.head_dim)[index],
            (positions,), fn(angles)))
    if dtype == "float32":  # no inputs to round: the frequencies alone
        checks.append(OpCheck("rope_frequencies", lambda: ops.rope_frequencies(s.head_dim), (),
                              ref.rope_angles(1.0, s.head_dim)))
    return checks


def attention_case(rng, dtype, s):
    q, k, v, mask = attention_inputs(rng, dtype, s, "padding+causal")
    checks = [OpCheck(f"dot_product_attention ({scale}, padding+causal, GQA)",
                      lambda q, k, v, m, scale=scale: ops.dot_product_attention(
                          q, k, v, mask=m, scale=scale, implementation="xla"),
                      (q, k, v, jnp.asarray(mask)),
                      ref.attention(host64(q), host64(k), host64(v), mask=mask, scale=scale))
              for scale in ("standard", "entropy_invariant")]
    # The structured mask (padding + prefix-LM, read without a dense [n, n] mask by the
    # blocked path) against the reference's boolean mask.
    q, k, v, _ = attention_inputs(rng, dtype, s, "none")
    valid = random_valid(rng, s.batch, s.n)
    prefix = rng.integers(0, s.n + 1, s.batch)
    structured = ref.padding_mask(valid) & ref.prefix_lm_mask(prefix, s.n)
    checks.append(OpCheck(
        "AttentionMask (padding + prefix-LM) in dot_product_attention (entropy_invariant, GQA)",
        lambda q, k, v, valid, prefix: ops.dot_product_attention(
            q, k, v, mask=ops.AttentionMask(valid=valid, causal=True, prefix_lengths=prefix),
            scale="entropy_invariant", implementation="xla"),
        (q, k, v, jnp.asarray(valid), jnp.asarray(prefix)),
        ref.attention(host64(q), host64(k), host64(v), mask=structured,
                      scale="entropy_invariant")))
    q, k, _, mask = attention_inputs(rng, dtype, s, "padding+causal")
    checks.append(OpCheck(
        "attention_entropy (entropy_invariant, padding+causal, GQA)",
        lambda q, k, m: ops.attention_entropy(q, k, mask=m, scale="entropy_invariant"),
        (q, k, jnp.asarray(mask)),
        ref.attention_entropy(host64(q), host64(k), mask=mask, scale="entropy_invariant")))
    if dtype == "float32":  # integer key counts in, float32 out, whatever the inputs' dtype
        counts = np.arange(1, 4 * s.n + 1)
        checks.append(OpCheck("entropy_invariant_scale", ops.entropy_invariant_scale,
                              (jnp.asarray(counts),), ref.entropy_invariant_scale(counts)))
    return checks


def global_pointer_case(rng, dtype, s):
    n, t, d = s.n // 2, s.types, s.head_dim // 2
    valid = random_valid(rng, s.batch, n)
    spans = ref.span_validity(n, valid)[:, None]  # [b, 1, n, n]
    spans = np.broadcast_to(spans, (s.batch, t, n, n))
    q = on_device(rng.standard_normal((s.batch, n, t, d)), dtype)
    k = on_device(rng.standard_normal((s.batch, n, t, d)), dtype)
    qe = on_device(rng.standard_normal((s.batch, n, d)), dtype)
    ke = on_device(rng.standard_normal((s.batch, n, d)), dtype)
    bs = on_device(rng.standard_normal((s.batch, n, t)), dtype)
    be = on_device(rng.standard_normal((s.batch, n, t)), dtype)
    return [
        OpCheck("global_pointer_logits (RoPE, padding)",
                lambda q, k, valid: ops.global_pointer_logits(q, k, valid=valid),
                (q, k, jnp.asarray(valid)), ref.global_pointer(host64(q), host64(k)), spans),
        OpCheck("efficient_global_pointer_logits (RoPE, padding)",
                lambda q, k, bs, be, valid: ops.efficient_global_pointer_logits(
                    q, k, bs, be, valid=valid),
                (qe, ke, bs, be, jnp.asarray(valid)),
                ref.efficient_global_pointer(host64(qe), host64(ke), host64(bs), host64(be)),
                spans),
    ]


def losses_case(rng, dtype, s):
    shape = (s.batch * 2, s.classes)
    logits = on_device(3 * rng.standard_normal(shape), dtype)
    labels = (rng.random(shape) < 0.05).astype(np.float32)
    soft = rng.random(shape).astype(np.float32)
    where = rng.random(shape) < 0.9
    host = host64(logits)
    positives = rng.integers(-1, s.classes, (shape[0], 8))
    other = on_device(3 * rng.standard_normal(shape), dtype)
    labels_int = rng.integers(0, s.classes, shape[0])
    weights = (rng.random(shape[0]) < 0.7).astype(np.float32)
    where_device = jnp.asarray(where)
    return [
        OpCheck("zlpr_loss (hard labels, where)",
                lambda s, t, w: ops.zlpr_loss(s, t, where=w),
                (logits, jnp.asarray(labels), where_device), ref.zlpr(host, labels, where=where)),
        OpCheck("zlpr_loss (soft labels)", ops.zlpr_loss, (logits, jnp.asarray(soft)),
                ref.zlpr(host, soft)),
        OpCheck("sparse_zlpr_loss (where)", lambda s, i, w: ops.sparse_zlpr_loss(s, i, where=w),
                (logits, jnp.asarray(positives, jnp.int32), where_device),
                ref.zlpr_from_indices(host, positives, where=where)),
        OpCheck("global_pointer_kl (where)", lambda s, t, w: ops.global_pointer_kl(s, t, where=w),
                (logits, other, where_device),
                ref.global_pointer_kl(host, host64(other), where=where)),
        OpCheck("softmax_kl (where)", lambda s, t, w: ops.softmax_kl(s, t, where=w),
                (logits, other, where_device), ref.softmax_kl(host, host64(other), where=where)),
        OpCheck("models.cross_entropy (weights)", models.cross_entropy,
                (logits, jnp.asarray(labels_int), jnp.asarray(weights)),
                np.asarray(ref.cross_entropy(host, labels_int, weights))),
    ]


def distances_case(rng, dtype, s):
    b, d = s.batch * 4, s.dist_dim
    mu1, mu2 = (on_device(rng.standard_normal((b, d)), dtype) for _ in range(2))
    cov1, cov2 = (on_device(spd(rng, b, d), dtype) for _ in range(2))
    # Rounding to bf16 can break the symmetry; the reference gets what the device holds.
    host = [host64(x) for x in (mu1, cov1, mu2, cov2)]
    args = (mu1, cov1, mu2, cov2)
    return [OpCheck(name, getattr(ops, name), args, getattr(ref, name)(*host))
            for name in ("gaussian_kl", "bhattacharyya_distance", "wasserstein2_distance")]


OP_CASES: tuple[OpCase, ...] = (rope_case, attention_case, global_pointer_case, losses_case,
                                distances_case)


def run_checks(checks: list[OpCheck]) -> list[jax.Array]:
    """Every check's `fn(*args)`, computed by one jitted program."""
    fns = [check.fn for check in checks]
    program = jax.jit(lambda args: [fn(*a) for fn, a in zip(fns, args, strict=True)])
    return program([check.args for check in checks])


def decoded_spans(logits: jax.Array) -> np.ndarray:
    """`ops.decode_spans(logits)` (jitted, with room for every span, `count` checked) as
    sorted rows `(example, type, start, end)`."""
    types, n = logits.shape[-3], logits.shape[-1]
    room = types * n * n
    spans, _, count = jax.jit(functools.partial(ops.decode_spans, max_spans=room))(logits)
    spans = np.asarray(spans).reshape(-1, room, 3)
    rows = [(b, *map(int, row)) for b in range(spans.shape[0]) for row in spans[b]
            if row[0] >= 0]
    if int(np.sum(count)) != len(rows):
        raise ValueError(f"decode_spans: `count` says {int(np.sum(count))} spans; "
                         f"{len(rows)} rows are filled")
    return np.asarray(sorted(rows), np.int64).reshape(-1, 4)


def random_span_rows(rng: np.random.Generator, batch: int, rows: int, types: int,
                     n: int) -> np.ndarray:
    """int32 `[batch, rows, 3]` span rows: spans, repeats, −1 padding rows and rows that
    are no span (type or end out of range, start after end)."""
    kind = rng.integers(-1, types + 1, (batch, rows))
    start = rng.integers(-1, n + 1, (batch, rows))
    end = start + rng.integers(-2, 4, (batch, rows))
    spans = np.stack([kind, start, end], axis=-1)
    spans[:, -2:] = -1  # padding
    spans[:, 1] = spans[:, 0]  # a repeated row
    return spans.astype(np.int32)


def exact_rows(rng, s) -> list[list[Any]]:
    """Exact checks (no tolerance): the boolean masks, span rows and their conversions,
    span decoding and span counts."""
    valid = random_valid(rng, s.batch, s.n)
    prefix = rng.integers(0, s.n + 1, s.batch)
    causal = ops.causal_mask(s.n)
    padding = ops.padding_mask(jnp.asarray(valid))
    n, t = s.n // 2, s.types
    span_valid = random_valid(rng, s.batch, n)
    # Spans that end before they start carry the large negative logit of a masked span,
    # so every form of decode_spans decodes the same rows.
    upper = np.triu(np.ones((n, n), bool))
    logits = jnp.asarray(np.where(upper, rng.standard_normal((s.batch, t, n, n)) - 1.5,
                                  -1e9), jnp.float32)
    span_rows = random_span_rows(rng, s.batch, 12, t, n)
    labels = rng.random((s.batch, t, n, n)) < 0.1
    tp, fp, fn = ref.span_counts(host64(logits), labels, valid=span_valid)
    counts = jax.jit(ops.span_f1)(logits, jnp.asarray(labels), valid=jnp.asarray(span_valid))
    expected_scores = ref.f1_scores(tp, fp, fn)
    scores = jax.jit(ops.f1_from_counts)(tp, fp, fn)
    pairs = [
        ("causal_mask", causal, ref.causal_mask(s.n)),
        ("causal_mask (cache: 4 of n keys)", ops.causal_mask(4, s.n), ref.causal_mask(4, s.n)),
        ("padding_mask", padding, ref.padding_mask(valid)),
        ("prefix_lm_mask", ops.prefix_lm_mask(jnp.asarray(prefix), s.n),
         ref.prefix_lm_mask(prefix, s.n)),
        ("combine_masks (causal, padding)", jax.jit(ops.combine_masks)(causal, padding),
         ref.causal_mask(s.n)[None] & ref.padding_mask(valid)),
        ("decode_spans", decoded_spans(logits), ref.decode_spans(host64(logits))),
        ("spans_to_flat", jax.jit(ops.spans_to_flat, static_argnums=(1, 2))(span_rows, t, n),
         ref.spans_to_flat(span_rows, t, n)),
        ("spans_to_dense", jax.jit(ops.spans_to_dense, static_argnums=(1, 2))(span_rows, t, n),
         ref.spans_to_dense(span_rows, t, n)),
        ("span_f1 (tp, fp, fn)", np.array([float(counts[k]) for k in ("tp", "fp", "fn")]),
         np.array([tp, fp, fn], np.float64)),
    ]
    rows = [[name, "exact", "—", "—", np.array_equal(np.asarray(out), expected)]
            for name, out, expected in pairs]
    error = max(abs(float(scores[k]) - v) for k, v in expected_scores.items())
    rows.append(["f1_from_counts", "float32", f"{error:.2e}", "1e-06", error <= 1e-6])
    return rows


def ops_section(section: Section, rng: np.random.Generator, sizes: Sizes) -> None:
    rows = []
    for dtype in DTYPES:
        with precision_for(dtype):
            for case in OP_CASES:
                try:
                    checks = case(rng, dtype, sizes)
                    outputs = run_checks(checks)
                except Exception as error:
                    line = section.record_error(f"{case.__name__} {dtype}", error)
                    rows.append([case.__name__, dtype, line, "—", False])
                    continue
                for check, out in zip(checks, outputs, strict=True):
                    name, expected, where = check.name, check.expected, check.where
                    error = normalized_error(out, expected, where)
                    passed = error <= TOLERANCE[dtype]
                    if where is not None:  # impossible spans: finite and large negative
                        outside = host64(out)[~where]
                        passed = passed and bool(np.all(np.isfinite(outside))
                                                 and np.all(outside < -1e4))
                    section.check(f"{name} {dtype}", passed)
                    rows.append([name, dtype, f"{error:.2e}", f"{TOLERANCE[dtype]:.0e}", passed])
    for row in exact_rows(rng, sizes):
        section.check(row[0], row[-1])
        rows.append(row)
    section.note("Error: max |device − float64 reference| / max |reference| over the "
                 "entries that exist; float32 at matmul precision 'highest'.")
    section.table(["op", "dtype", "error", "tolerance", "ok"], rows)


# ----------------------------------------------------------------------------- attention


ATTENTION_CASES = (
    # (name, scale, mask kind, grouped-query heads)
    ("standard, no mask, GQA", "standard", "none", True),
    ("entropy-invariant, no mask, MHA", "entropy_invariant", "none", False),
    ("standard, padding, MHA", "standard", "padding", False),
    ("entropy-invariant, padding+causal, GQA", "entropy_invariant", "padding+causal", True),
)


def attention_inputs(rng, dtype, s, mask_kind: str, gqa: bool = True):
    kv_heads = s.kv_heads if gqa else s.heads
    q = on_device(rng.standard_normal((s.batch, s.n, s.heads, s.head_dim)), dtype)
    k = on_device(rng.standard_normal((s.batch, s.n, kv_heads, s.head_dim)), dtype)
    v = on_device(rng.standard_normal((s.batch, s.n, kv_heads, s.head_dim)), dtype)
    valid = random_valid(rng, s.batch, s.n)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "padding":
        mask = ref.padding_mask(valid)
    else:
        mask = ref.padding_mask(valid) & ref.causal_mask(s.n)[None]
    return q, k, v, mask


def implementations() -> list[tuple[str, tuple[str, ...] | None]]:
    """`(implementation, dtypes)` to check besides XLA; dtypes None = skipped here, and
    the reason is the implementation's absence from this backend."""
    found = []
    for name in ATTENTION_IMPLEMENTATIONS:
        if name in (None, "xla"):
            continue
        if name in GPU_ONLY:
            found.append((name, GPU_ONLY[name] if jax.default_backend() == "gpu" else None))
        else:
            found.append((name, DTYPES))
    return found


def _attention_fn(implementation: str, scale: str):
    return functools.partial(ops.dot_product_attention, scale=scale,
                             implementation=implementation)


def attention_and_gradients(fn, q, k, v, mask, weights):
    """`fn(q, k, v, mask=mask)` and the gradients of `Σ weights · fn(...)` with respect
    to `q, k, v`, in one jitted program."""
    def loss(q, k, v):
        out = fn(q, k, v, mask=mask)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    @jax.jit
    def both(q, k, v):
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return both(q, k, v)


def reference_directional_derivative(q, k, v, mask, scale, weights, directions) -> float:
    """Central difference of `Σ w · attention_ref(q, k, v)` along `directions`, float64."""
    step = 1e-6

    def loss(t):
        moved = [x + t * u for x, u in zip((q, k, v), directions, strict=True)]
        return float(np.sum(ref.attention(*moved, mask=mask, scale=scale) * weights))

    return (loss(step) - loss(-step)) / (2 * step)


def attention_section(section: Section, rng: np.random.Generator, sizes: Sizes) -> None:
    others = implementations()
    runs = [("xla", DTYPES)] + [(name, dtypes) for name, dtypes in others if dtypes]
    for name, dtypes in others:
        if not dtypes:
            section.note(f"`{name}` skipped: it runs on NVIDIA GPUs only; this backend is "
                         f"{jax.default_backend()}.")
    section.data["implementations"] = [name for name, _ in runs]
    rows, against_xla = [], []
    for case_name, scale, mask_kind, gqa in ATTENTION_CASES:
        for dtype in DTYPES:
            q, k, v, mask = attention_inputs(rng, dtype, sizes, mask_kind, gqa)
            mask_device = None if mask is None else jnp.asarray(mask)
            host = [host64(x) for x in (q, k, v)]
            expected = ref.attention(*host, mask=mask, scale=scale)
            weights = rng.standard_normal(expected.shape)
            directions = [rng.standard_normal(x.shape) for x in host]
            dd_ref = reference_directional_derivative(*host, mask, scale, weights, directions)
            weights_device = jnp.asarray(weights, jnp.float32)
            outputs = {}
            with precision_for(dtype):
                for implementation, allowed in runs:
                    if dtype not in allowed:
                        continue
                    fn = _attention_fn(implementation, scale)
                    try:
                        out, grads = attention_and_gradients(fn, q, k, v, mask_device,
                                                             weights_device)
                    except Exception as error:
                        what = f"{implementation} {case_name} {dtype}"
                        rows.append([implementation, case_name, dtype,
                                     section.record_error(what, error), "—", False])
                        continue
                    outputs[implementation] = (out, grads)
                    error = normalized_error(out, expected)
                    products = [host64(g) * u for g, u in zip(grads, directions, strict=True)]
                    dd = float(sum(np.sum(p) for p in products))
                    l1 = float(sum(np.sum(np.abs(p)) for p in products))
                    grad_error = (abs(dd - dd_ref) / max(l1, 1e-30) if math.isfinite(dd)
                                  else math.inf)
                    passed = section.check(
                        f"{implementation} {case_name} {dtype}",
                        error <= TOLERANCE[dtype] and grad_error <= GRAD_TOLERANCE[dtype])
                    rows.append([implementation, case_name, dtype, f"{error:.2e}",
                                 f"{grad_error:.2e}", passed])
            base = outputs.get("xla")
            for implementation, (out, grads) in outputs.items():
                if implementation == "xla" or base is None:
                    continue
                out_error = normalized_error(out, host64(base[0]))
                grad_error = max(normalized_error(g, host64(g_xla))
                                 for g, g_xla in zip(grads, base[1], strict=True))
                passed = section.check(
                    f"{implementation} vs xla {case_name} {dtype}",
                    max(out_error, grad_error) <= TOLERANCE[dtype])
                against_xla.append([implementation, case_name, dtype, f"{out_error:.2e}",
                                    f"{grad_error:.2e}", passed])
    section.note(f"Shapes: batch {sizes.batch}, n {sizes.n}, {sizes.heads} query heads "
                 f"(GQA: {sizes.kv_heads} key/value heads), head dim {sizes.head_dim}. "
                 "Forward error as in the ops table; gradient error "
                 "|Σ g·u − dd_ref| / Σ|g·u| for random directions u, dd_ref a float64 "
                 "central difference of the reference.")
    section.table(["implementation", "case", "dtype", "forward error", "gradient error", "ok"],
                  rows, title="Against the float64 reference")
    if against_xla:
        section.table(["implementation", "case", "dtype", "output vs xla",
                       "gradients vs xla (max of dq, dk, dv)", "ok"], against_xla,
                      title="Against XLA in the same dtype")


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One trained model: its flat `ModelSpec` settings, its `kexue.tasks` task and a
    batch in the format `kexue.data` gives that task."""

    name: str
    settings: dict[str, Any]
    task: Any
    batch: dict[str, np.ndarray]


def model_cases(rng: np.random.Generator, s: Sizes) -> list[ModelCase]:
    """The causal LM, the RoFormer MLM (entropy-invariant), GlobalPointer NER and the
    multilabel classifier, each with its task's loss and a random batch."""
    common = dict(width=s.model_width, num_layers=s.model_layers, num_heads=s.model_heads,
                  mlp_dim=2 * s.model_width, vocab_size=s.vocab, dropout_rate=0.0)
    b, n = 2 * s.batch, s.n
    tokens = rng.integers(2, s.vocab, (b, n + 1)).astype(np.int32)
    valid = random_valid(rng, b, n)
    chosen = (rng.random((b, n)) < 0.15) & valid
    chosen[:, 0] = True
    spans = random_span_rows(rng, b, 8, s.types, n)
    classes = s.types * 4
    examples = np.ones(b, np.float32)
    return [
        ModelCase("causal LM", {"name": "causal_lm", **common, "tie_embeddings": True,
                                "norm": "rmsnorm", "rope_layout": "half"},
                  tasks.LMTask(), {"tokens": tokens, "weights": np.ones((b, n), np.float32)}),
        ModelCase("RoFormer MLM (entropy-invariant)",
                  {"name": "roformer_mlm", **common, "norm_position": "post",
                   "attention_scale": "entropy_invariant"},
                  tasks.MLMTask(eval_lengths=(n,)),
                  {"tokens": np.where(chosen, 1, tokens[:, :n]).astype(np.int32),
                   "labels": tokens[:, :n], "weights": chosen.astype(np.float32),
                   "valid": valid}),
        ModelCase("GlobalPointer NER", {"name": "global_pointer_ner", **common,
                                        "num_types": s.types, "gp_head_dim": 16},
                  tasks.NERTask(num_types=s.types),
                  {"tokens": tokens[:, :n], "valid": valid, "spans": spans,
                   "example_weights": examples}),
        ModelCase("multilabel classifier", {"name": "multilabel_classifier", **common,
                                            "num_classes": classes, "pooling": "mean"},
                  tasks.MultiLabelTask(num_classes=classes),
                  {"tokens": tokens[:, :n], "valid": valid,
                   "type_labels": (rng.random((b, classes)) < 0.3).astype(np.int32),
                   "example_weights": examples}),
    ]


def bf16_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The model settings with bf16 compute (and cuDNN attention on GPU)."""
    gpu = jax.default_backend() == "gpu"
    return {**settings, "dtype": "bfloat16",
            "attention_implementation": "cudnn" if gpu else None}


def model_factory(settings: dict[str, Any]) -> Callable[[], nnx.Module]:
    """The model of `settings` with parameters from seed 0."""
    spec = models.ModelSpec.from_settings(settings)
    return lambda: models.build_model(spec, rngs=nnx.Rngs(0))


@dataclasses.dataclass
class StepResult:
    """One `make_train_step` step with `optax.sgd(1)`: `params − new params` is the gradient."""

    loss: float
    grad_norm: float
    nonfinite: int
    gradient: np.ndarray  # flattened, float64
    state: train.TrainState


def sgd_step(settings: dict[str, Any], task: Any, batch: dict[str, np.ndarray]) -> StepResult:
    """One product train step (`kexue.train.make_train_step`, jitted, state donated) of
    the model `settings` describe (seed 0) on one device, with the task's loss and plain
    SGD at rate 1, so the parameter change is the gradient itself."""
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    tx = optax.sgd(1.0)
    factory = model_factory(settings)
    state = train.create_train_state(factory, tx, mesh)
    before = [host64(p) for p in jax.tree.leaves(state.params)]
    step = train.make_train_step(task.loss, tx, train.abstract_train_state(factory, tx, mesh),
                                 mesh, compiler_options=train.cpu_compiler_options(mesh))
    state, metrics = step(state, parallel.shard_batch(
        {k: jnp.asarray(v) for k, v in batch.items()}, mesh))
    after = [host64(p) for p in jax.tree.leaves(state.params)]
    gradient = np.concatenate([(b - a).ravel() for b, a in zip(before, after, strict=True)])
    return StepResult(float(metrics["loss"]), float(metrics["grad_norm"]),
                      int(metrics["nonfinite"]), gradient, state)


def models_section(section: Section, rng: np.random.Generator, sizes: Sizes
                   ) -> dict[str, tuple[dict[str, Any], train.TrainState]]:
    """Returns each model's bf16 settings and state after its step (the checkpoint
    section saves the first)."""
    rows, states = [], {}
    for case in model_cases(rng, sizes):
        low_settings = bf16_settings(case.settings)
        attention = low_settings["attention_implementation"] or "xla"
        try:
            full = sgd_step(case.settings, case.task, case.batch)
            low = sgd_step(low_settings, case.task, case.batch)
        except Exception as error:
            rows.append([case.name, attention, section.record_error(case.name, error),
                         *["—"] * 5, False])
            continue
        states[case.name] = (low_settings, low.state)
        loss_error = abs(low.loss - full.loss) / max(abs(full.loss), 1e-30)
        finite = (math.isfinite(low.loss) and low.nonfinite == 0
                  and bool(np.all(np.isfinite(low.gradient))))
        grad_error = (float(np.linalg.norm(low.gradient - full.gradient)
                            / np.linalg.norm(full.gradient)) if finite else math.inf)
        passed = section.check(case.name, loss_error <= MODEL_LOSS_TOLERANCE
                               and grad_error <= MODEL_GRAD_TOLERANCE and finite)
        rows.append([case.name, attention, f"{full.loss:.4f}", f"{low.loss:.4f}",
                     f"{loss_error:.1e}", f"{grad_error:.1e}", f"{low.grad_norm:.3g}", finite,
                     passed])
    section.note(f"Width {sizes.model_width}, {sizes.model_layers} layer(s), "
                 f"{sizes.model_heads} heads, batch {2 * sizes.batch} x {sizes.n}; parameters "
                 "float32 from seed 0 on both sides; one `make_train_step` step with the "
                 "`kexue.tasks` loss of each model and SGD at rate 1, so the parameter change "
                 f"is the gradient. Tolerances: loss {MODEL_LOSS_TOLERANCE:.0e} relative, "
                 f"gradient {MODEL_GRAD_TOLERANCE:.0e} relative L2; the bf16 step must be "
                 "finite (loss, gradient, no skipped step).")
    section.table(["model", "bf16 attention", "loss f32", "loss bf16", "loss rel. error",
                   "grad rel. L2 error", "bf16 grad norm", "bf16 step finite", "ok"], rows)
    return states


# ----------------------------------------------------------------------------- checkpoint


def _leaf_values(tree: Any) -> list[np.ndarray]:
    leaves = []
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        leaves.append(np.asarray(jax.device_get(leaf)))
    return leaves


def checkpoint_section(section: Section, saved_model: tuple[str, dict[str, Any],
                       train.TrainState] | None) -> None:
    """Saves `saved_model`'s state (name, model settings, state on the device) and
    restores it onto a CPU mesh."""
    if saved_model is None:
        section.skip("the models section produced no state to save")
        return
    name, settings, saved = saved_model
    directory = tempfile.mkdtemp(prefix="kexue-accelerator-checkpoint-")
    try:
        start = time.perf_counter()
        checkpoints = train.Checkpointer(directory, log=lambda message: None)
        checkpoints.save(saved)
        checkpoints.close()
        save_s = time.perf_counter() - start
        mesh = parallel.make_mesh(devices=jax.devices("cpu")[:1])
        factory = model_factory(settings)
        start = time.perf_counter()
        reader = train.Checkpointer(directory, log=lambda message: None)
        restored = reader.restore_latest(
            train.abstract_train_state(factory, optax.sgd(1.0), mesh)).state
        reader.close()
        restore_s = time.perf_counter() - start
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    before, after = _leaf_values(saved), _leaf_values(restored)
    same = len(before) == len(after) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(before, after, strict=True))
    platforms = sorted({d.platform for leaf in jax.tree.leaves(restored)
                        for d in leaf.devices()})
    written_on = sorted({d.platform for leaf in jax.tree.leaves(saved) for d in leaf.devices()})
    section.check("restored bit-identical on CPU", same and platforms == ["cpu"])
    section.table(["model", "written on", "restored on", "leaves", "bytes", "save s",
                   "restore s", "bit-identical"],
                  [[f"{name} (bf16 compute, after its step)", ",".join(written_on),
                    ",".join(platforms), len(before), sum(a.nbytes for a in before),
                    f"{save_s:.2f}", f"{restore_s:.2f}", same]])
