"""Causal-LM training throughput, MFU against the measured matmul peak, remat memory.

    python -m benchmarks.lm            # a few minutes on two CPU cores
    python -m benchmarks.lm --quick    # tiny shapes, well under a minute

1. **Measured peak**: `jnp.dot` of square matrices (float32 on CPU, bf16 on GPU/TPU),
   jitted, median time → GFLOP/s; the best size is the peak every MFU below is divided
   by. On a GPU/TPU the device's nominal dense bf16 peak is printed too, with the MFU
   against it. On a GPU/TPU the throughput cases are a ~124M-parameter GPT (width 768,
   12 layers, 50304-token tied vocabulary, bf16 compute, cuDNN fused attention on
   NVIDIA GPUs via `model.attention_implementation`) at batch 16 × 1024, and the
   `configs/lm_stdlib.py` model.
2. **Throughput and MFU**: the product train step (`kexue.train.make_train_step`:
   forward, cross-entropy, backward, non-finite guard, optimizer update; jitted with
   the state donated and `optim.CPU_COMPILER_OPTIONS` on CPU) for AdamW and Amos, on a
   matmul-heavy causal LM and on the model of `configs/lm_stdlib.py`. Model FLOPs per
   step are `kexue.models.flops_per_token` (`6·N + 12·L·D·n` per token) times the
   tokens; MFU = (model FLOPs / step time) / measured peak (the best of the
   separate measurement and the same matmul re-timed in the loop). A breakdown times the
   forward loss, forward + backward, and the whole step.
3. **Remat and length**: the compiled gradient step's peak bytes (temp + arguments,
   `memory_analysis()`) for each `model.remat` policy, doubling the sequence length
   until the budget is exceeded; one step is run at the longest length found for
   ``remat="none"``, and step times of all policies are compared at one length.
4. **GlobalPointer heads**: see `benchmarks.heads` (printed here too).

All timings of one table are interleaved (`benchmarks.common.interleaved_median_times`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

from benchmarks import heads
from benchmarks import optim as bench_optim
from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import models, tasks
from kexue.models import REMAT_POLICIES
from kexue.parallel import make_mesh
from kexue.train import (
    abstract_train_state,
    cpu_compiler_options,
    create_train_state,
    make_train_step,
)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class LMCase:
    """One causal-LM throughput case: the `model` section, batch size and length."""

    label: str
    model: dict[str, Any]
    batch: int
    seq_len: int

    def spec(self, **overrides: Any) -> models.ModelSpec:
        return causal_lm_spec(self.model, **overrides)


def causal_lm_spec(model: dict[str, Any], **overrides: Any) -> models.ModelSpec:
    """The `ModelSpec` of a causal LM with the settings `model` (and `overrides`)."""
    return models.ModelSpec.from_settings({"name": "causal_lm", **model, **overrides})


def lm_stdlib_model() -> tuple[dict[str, Any], int, int]:
    """The `model` section, batch size and length of `configs/lm_stdlib.py` (byte vocab)."""
    from configs.lm_stdlib import get_config

    config = get_config()
    model = config.model.to_dict()
    model.pop("name")
    model["vocab_size"] = 261  # the byte tokenizer: 256 bytes and 5 specials
    return model, int(config.data.batch_size), int(config.data.seq_len)


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def peak_dtype() -> Any:
    """The compute dtype the peak is measured in: bf16 on GPU/TPU, float32 on CPU."""
    return jnp.bfloat16 if on_accelerator() else jnp.float32


#: Nominal dense bf16 peaks (FLOP/s, no sparsity) by device-kind substring.
NOMINAL_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "v5p": 459e12,
                     "v5 lite": 197e12, "v4": 275e12}


def nominal_peak() -> tuple[str, float] | None:
    kind = jax.devices()[0].device_kind
    for name, flops in NOMINAL_BF16_PEAK.items():
        if name.lower() in kind.lower():
            return kind, flops
    return None


def gpt_model(width: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    """A GPT-2-shaped LM section: `mlp_dim = 4·width`, the tied 50304-token embedding,
    RMSNorm, half-layout RoPE, bf16 compute, cuDNN fused attention on GPU."""
    return dict(width=width, num_layers=num_layers, num_heads=num_heads, mlp_dim=4 * width,
                vocab_size=50304, tie_embeddings=True, norm="rmsnorm", rope_layout="half",
                dtype="bfloat16",
                attention_implementation="cudnn" if jax.default_backend() == "gpu" else None)


def gpt_125m() -> dict[str, Any]:
    """GPT-2 small's shape (~124M parameters): width 768, 12 layers, 12 heads."""
    return gpt_model(768, 12, 12)


def gpt_350m() -> dict[str, Any]:
    """GPT-2 medium's shape (~355M parameters): width 1024, 24 layers, 16 heads."""
    return gpt_model(1024, 24, 16)


def full_cases() -> list[LMCase]:
    stdlib, batch, seq_len = lm_stdlib_model()
    if on_accelerator():
        return [LMCase("~125M GPT (D 768, L 12, bf16)", gpt_125m(), 16, 1024),
                LMCase("lm_stdlib default (D 256, L 4, F 1024)", stdlib, batch, seq_len)]
    wide = dict(width=1024, num_layers=2, num_heads=16, mlp_dim=4096, vocab_size=261,
                tie_embeddings=True, norm="rmsnorm", rope_layout="half")
    return [LMCase("matmul-heavy (D 1024, L 2, F 4096)", wide, 4, 256),
            LMCase("lm_stdlib default (D 256, L 4, F 1024)", stdlib, batch, seq_len)]


def quick_cases() -> list[LMCase]:
    tiny = dict(width=64, num_layers=2, num_heads=4, mlp_dim=256, vocab_size=64,
                tie_embeddings=True)
    return [LMCase("tiny (D 64, L 2)", tiny, 4, 32)]


# ----------------------------------------------------------------------------- peak


def matmul(size: int) -> Callable[[], jax.Array]:
    """A zero-argument jitted `jnp.dot` of two `[size, size]` matrices (`peak_dtype()`)."""
    key_a, key_b = jax.random.split(jax.random.key(size))
    a = jax.random.normal(key_a, (size, size), peak_dtype())
    b = jax.random.normal(key_b, (size, size), peak_dtype())
    dot = jax.jit(jnp.dot)
    return lambda: dot(a, b)


def matmul_peak(sizes: Sequence[int], *, repeats: int = 5,
                ) -> tuple[float, int, list[list[str]]]:
    """Best float32 matmul rate (FLOP/s) over square sizes, its size, a row per size.

    Size `s` times `jnp.dot` of two `[s, s]` matrices (`2 s³` FLOPs), jitted; the
    sizes are interleaved and the median kept.
    """
    times = interleaved_median_times([matmul(s) for s in sizes], repeats=repeats, warmup=1)
    rates = [2 * s**3 / t for s, t in zip(sizes, times, strict=True)]
    rows = [[f"{s} x {s}", f"{t * 1e3:.1f}", f"{r / 1e9:.1f}"]
            for s, t, r in zip(sizes, times, rates, strict=True)]
    best = int(np.argmax(rates))
    return rates[best], sizes[best], rows


# ----------------------------------------------------------------------------- throughput


#: The causal-LM objective of `kexue.tasks` (next-token cross-entropy).
LM_TASK = tasks.LMTask()


#: Optimizer names of the throughput tables → their entries in `benchmarks.optim.optimizers`.
OPTIMIZERS = {"adamw": "optax.adamw", "amos": "amos", "amos_style": "amos_style (adam)"}


def optimizer(name: str, model_factory: Callable[[], nnx.Module]) -> optax.GradientTransformation:
    """AdamW (optax), Amos or Amos-style with an Adam direction (kexue.optim; per-tensor
    scales read off the initial parameters), as `benchmarks.optim.optimizers` builds them."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}; got {name!r}")
    return bench_optim.optimizers(models.initial_params(model_factory))[OPTIMIZERS[name]]


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    """An LM batch of uniform random tokens `[batch, seq_len + 1]`, every target real."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1))
    return {"tokens": jnp.asarray(tokens, jnp.int32),
            "weights": jnp.ones((batch, seq_len), jnp.float32)}


def train_stepper(case: LMCase, optimizer_name: str) -> Callable[[], jax.Array]:
    """A zero-argument function doing one product train step (state donated, kept)."""
    spec = case.spec()

    def factory() -> nnx.Module:
        return models.build_model(spec, rngs=nnx.Rngs(0))

    mesh = make_mesh(devices=jax.devices()[:1])
    tx = optimizer(optimizer_name, factory)
    state = create_train_state(factory, tx, mesh)
    step = make_train_step(LM_TASK.loss, tx, abstract_train_state(factory, tx, mesh), mesh,
                           compiler_options=cpu_compiler_options(mesh))
    batch = random_batch(case.batch, case.seq_len, case.model["vocab_size"])
    box = [state]

    def run() -> jax.Array:
        box[0], metrics = step(box[0], batch)
        return metrics["loss"]

    return run


def num_params(case: LMCase) -> int:
    abstract = nnx.eval_shape(lambda: models.build_model(case.spec(), rngs=nnx.Rngs(0)))
    return models.count_params(abstract)


def step_flops(case: LMCase) -> int:
    """Model FLOPs of one training step: `flops_per_token · batch · length`."""
    return models.flops_per_token(case.spec(), seq_len=case.seq_len) * case.batch * case.seq_len


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One timed train step: the case, optimizer, parameters, model FLOPs, median seconds."""

    case: LMCase
    optimizer: str
    params: int
    flops: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.case.batch * self.case.seq_len / self.seconds

    @property
    def achieved(self) -> float:
        """Model FLOP/s."""
        return self.flops / self.seconds


def throughput(cases: Sequence[LMCase], optimizers: Sequence[str], peak: float,
               peak_size: int, *, repeats: int) -> tuple[list[Throughput], float]:
    """Each (case, optimizer) train step timed, and the peak MFU divides by.

    The `peak_size` matmul is re-timed in the same interleaved loop as the train
    steps; the peak returned is the larger of `peak` (the separately measured peak) and
    that in-loop rate, the best the machine showed (a lower rate only reflects load).
    """
    keys = [(case, name) for case in cases for name in optimizers]
    runners = [matmul(peak_size)] + [train_stepper(case, name) for case, name in keys]
    matmul_time, *times = interleaved_median_times(runners, repeats=repeats, warmup=1)
    peak = max(peak, 2 * peak_size**3 / matmul_time)
    return [Throughput(case, name, num_params(case), step_flops(case), seconds)
            for (case, name), seconds in zip(keys, times, strict=True)], peak


THROUGHPUT_HEADER = ["model", "optimizer", "batch x len", "params", "GFLOP/step", "step (ms)",
                     "tokens/s", "GFLOP/s", "MFU (of measured peak)"]


def throughput_row(t: Throughput, peak: float) -> list[str]:
    return [t.case.label, t.optimizer, f"{t.case.batch} x {t.case.seq_len}", f"{t.params:,}",
            f"{t.flops / 1e9:.2f}", f"{t.seconds * 1e3:.0f}", f"{t.tokens_per_s:,.0f}",
            f"{t.achieved / 1e9:.1f}", f"{t.achieved / peak:.0%}"]


def throughput_rows(cases: Sequence[LMCase], optimizers: Sequence[str], peak: float,
                    peak_size: int, *, repeats: int) -> tuple[list[list[str]], float]:
    """`throughput` as table rows (`THROUGHPUT_HEADER`): step time, tokens/s, achieved
    GFLOP/s, MFU against the peak used, which is returned with the rows."""
    measured, peak = throughput(cases, optimizers, peak, peak_size, repeats=repeats)
    return [throughput_row(t, peak) for t in measured], peak


def breakdown_rows(case: LMCase, peak: float, peak_size: int, *,
                   repeats: int) -> list[list[str]]:
    """Forward loss, forward + backward, and the full AdamW step of one case, jitted,
    interleaved with the `peak_size` matmul; the last column divides by the larger of
    `peak` and that matmul's in-loop rate (as `throughput_rows`)."""
    model = models.build_model(case.spec(), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    batch = random_batch(case.batch, case.seq_len, case.model["vocab_size"])

    def loss(params, batch):
        return LM_TASK.loss(nnx.merge(graphdef, params, rest), batch, None)[0]

    forward = jax.jit(loss)
    backward = jax.jit(jax.value_and_grad(loss))
    step = train_stepper(case, "adamw")
    fns = [matmul(peak_size), lambda: forward(params, batch),
           lambda: backward(params, batch)[0], step]
    matmul_time, *times = interleaved_median_times(fns, repeats=repeats, warmup=1)
    peak = max(peak, 2 * peak_size**3 / matmul_time)
    flops = step_flops(case)
    parts = [("forward (loss)", flops / 3), ("forward + backward", flops),
             ("full step (adamw)", flops)]
    return [[case.label, part, f"{seconds * 1e3:.0f}", f"{f / seconds / 1e9:.1f}",
             f"{f / seconds / peak:.0%}"]
            for (part, f), seconds in zip(parts, times, strict=True)]


# ----------------------------------------------------------------------------- remat / length


def grad_step(spec: models.ModelSpec, batch: int, seq_len: int,
              compiler_options: dict[str, Any] | None):
    """`(jitted AdamW step, params, opt state, batch)`: value_and_grad + update, donated."""
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    tokens = random_batch(batch, seq_len, spec.transformer.vocab_size)

    def step(params, opt_state, batch):
        def loss(params):
            return LM_TASK.loss(nnx.merge(graphdef, params, rest), batch, None)[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
    return jitted, params, opt_state, tokens


def compiled_peak_bytes(spec: models.ModelSpec, batch: int, seq_len: int,
                        compiler_options: dict[str, Any] | None) -> int:
    """temp + argument bytes of the compiled step (nothing is run)."""
    step, params, opt_state, tokens = grad_step(spec, batch, seq_len, compiler_options)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          (params, opt_state, tokens))
    memory = step.lower(*shapes).compile().memory_analysis()
    return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes)


def remat_options() -> dict[str, Any] | None:
    """Compiler options of the remat study: CPU copy insertion + the memory scheduler."""
    return cpu_compiler_options(make_mesh(devices=jax.devices()[:1]), remat=True)


def max_length(spec: models.ModelSpec, batch: int, start: int, limit: int,
               budget: int, options: dict[str, Any] | None, *,
               deadline: float | None = None) -> tuple[int, int, list[tuple[int, int]]]:
    """Longest power-of-two multiple of `start` (≤ `limit`) whose compiled step fits.

    The step's memory grows with the length, so the doublings are bisected: `start`
    first, then `limit`, then the middle of the lengths still undecided (each try is
    one compilation). With `deadline` (a `time.time()` value) no new length is tried
    after it, and the result is a lower bound.

    Returns `(length, its peak bytes, (length, peak bytes) of every length tried in
    order)`; length 0 when even `start` does not fit.
    """
    lengths = []
    length = start
    while length <= limit:
        lengths.append(length)
        length *= 2
    fits, fails = -1, len(lengths)  # indices: the longest known to fit, shortest known not
    best_bytes, tried = 0, []
    while fits + 1 < fails:
        if deadline is not None and time.time() > deadline:
            break
        index = 0 if fits < 0 else len(lengths) - 1 if fails == len(lengths) else (
            (fits + fails) // 2)
        peak = compiled_peak_bytes(spec, batch, lengths[index], options)
        tried.append((lengths[index], peak))
        if peak <= budget:
            fits, best_bytes = index, peak
        else:
            fails = index
    return (lengths[fits] if fits >= 0 else 0), best_bytes, tried


def run_one_step(spec: models.ModelSpec, batch: int, seq_len: int,
                 options: dict[str, Any] | None) -> tuple[float, float]:
    """Runs one step (after compiling); returns `(seconds, loss)`."""
    step, params, opt_state, tokens = grad_step(spec, batch, seq_len, options)
    compiled = step.lower(params, opt_state, tokens).compile()
    start = time.perf_counter()
    _, _, loss = compiled(params, opt_state, tokens)
    loss = float(loss)
    return time.perf_counter() - start, loss


def remat_rows(model: dict[str, Any], *, batch: int, start: int, limit: int, budget: int,
               common_len: int, repeats: int,
               policies: Sequence[str] = tuple(REMAT_POLICIES),
               ) -> tuple[list[list[str]], tuple[str, int, float, float]]:
    """Per policy: longest length in budget, its peak GiB, peak GiB and step time at
    `common_len` (interleaved); plus `(policy, length, seconds, loss)` of the one real
    step run at the longest length found for ``"none"``."""
    options = remat_options()
    found = {}
    for policy in policies:
        found[policy] = max_length(causal_lm_spec(model, remat=policy), batch, start, limit,
                                   budget, options)
    runners, common_bytes = [], []
    for policy in policies:
        step, params, opt_state, tokens = grad_step(causal_lm_spec(model, remat=policy), batch,
                                                    common_len, options)
        compiled = step.lower(params, opt_state, tokens).compile()
        memory = compiled.memory_analysis()
        common_bytes.append(memory.temp_size_in_bytes + memory.argument_size_in_bytes)
        box = [params, opt_state]

        def run(compiled=compiled, box=box, tokens=tokens):
            box[0], box[1], loss = compiled(box[0], box[1], tokens)
            return loss

        runners.append(run)
    times = interleaved_median_times(runners, repeats=repeats, warmup=1)
    rows = []
    for policy, seconds, nbytes in zip(policies, times, common_bytes, strict=True):
        length, peak, _ = found[policy]
        longest = f"{length}" + (" (limit)" if length == limit else "")
        rows.append([policy, longest, f"{peak / GIB:.2f}", f"{nbytes / GIB:.3f}",
                     f"{seconds * 1e3:.0f}", f"{seconds / times[0]:.2f}x"])
    first = policies[0]
    proof_len = found[first][0]
    seconds, loss = (run_one_step(causal_lm_spec(model, remat=first), batch, proof_len, options)
                     if proof_len
                     else (float("nan"), float("nan")))
    return rows, (first, proof_len, seconds, loss)


# ----------------------------------------------------------------------------- main


FULL = {"peak_sizes": (1024, 2048, 3072), "peak_repeats": 5, "repeats": 5,
        "remat": {"batch": 4, "start": 256, "limit": 4096, "budget": GIB,
                  "common_len": 256, "repeats": 3},
        "heads": heads.FULL}
QUICK = {"peak_sizes": (256, 512), "peak_repeats": 3, "repeats": 2,
         "remat": {"batch": 2, "start": 32, "limit": 64, "budget": 64 * 2**20,
                   "common_len": 32, "repeats": 2, "policies": ("none", "full")},
         "heads": heads.QUICK}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if on_accelerator() and not args.quick:
        size = {**size, "peak_sizes": (4096, 8192, 16384), "repeats": 10}
    cases = quick_cases() if args.quick else full_cases()

    print(f"## Causal LM training ({today()}; {machine_description()})\n")
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
          f"optax {optax.__version__}, numpy {np.__version__}.\n")
    peak, peak_size, peak_rows = matmul_peak(size["peak_sizes"], repeats=size["peak_repeats"])
    print(f"### Measured peak: {jnp.dtype(peak_dtype()).name} matmul\n")
    print(markdown_table(["size", "time (ms)", "GFLOP/s"], peak_rows))
    print(f"\nmeasured peak = {peak / 1e9:.1f} GFLOP/s (best size, {peak_size}). The "
          f"{peak_size} matmul is re-timed inside each loop below; MFU divides by the "
          "larger of the two rates.\n")

    rows, used_peak = throughput_rows(cases, ("adamw", "amos"), peak, peak_size,
                                      repeats=size["repeats"])
    print("### Train step throughput (product `make_train_step`)\n")
    print(markdown_table(["model", "optimizer", "batch x len", "params", "GFLOP/step",
                          "step (ms)", "tokens/s", "GFLOP/s", "MFU (of measured peak)"],
                         rows))
    print(f"\npeak used for MFU: {used_peak / 1e9:.1f} GFLOP/s.")
    nominal = nominal_peak()
    if nominal is not None:
        kind, flops = nominal
        print(f"Nominal dense bf16 peak of {kind}: {flops / 1e12:.1f} TFLOP/s; MFU against it "
              "= GFLOP/s column ÷ " + f"{flops / 1e9:.0f}: " + ", ".join(
                  f"{row[0]} {row[1]} {float(row[7]) * 1e9 / flops:.0%}" for row in rows))
    breakdown = [row for case in cases for row in
                 breakdown_rows(case, peak, peak_size, repeats=size["repeats"])]
    print("\n### Where the step's time goes (jitted pieces; forward = 1/3 of model FLOPs)\n")
    print(markdown_table(["model", "piece", "time (ms)", "GFLOP/s", "of peak"], breakdown))

    r = size["remat"]
    model = cases[-1].model
    remat_table, (policy, length, seconds, loss) = remat_rows(
        model, batch=r["batch"], start=r["start"], limit=r["limit"], budget=r["budget"],
        common_len=r["common_len"], repeats=r["repeats"],
        policies=r.get("policies", tuple(REMAT_POLICIES)))
    print(f"\n### Remat: longest trainable length at batch {r['batch']} "
          f"(budget {r['budget'] / GIB:.2f} GiB of compiled temp + arguments; "
          f"model {cases[-1].label}; AdamW step; lengths doubled from {r['start']})\n")
    print(markdown_table(["remat", "max length", "peak GiB at max",
                          f"peak GiB at {r['common_len']}", f"step (ms) at {r['common_len']}",
                          "time vs none"], remat_table))
    print(f"\nOne real step with remat={policy!r} at length {length}: {seconds:.2f} s, "
          f"loss {loss:.3f}.\n")

    h = size["heads"]
    head_table = heads.head_rows(h["lengths"], batch=h["batch"], width=h["width"],
                                 types=h["types"], head_dim=h["head_dim"],
                                 repeats=h["repeats"])
    print(heads.describe(h))
    print(markdown_table(heads.HEADER, head_table))
    return {"peak": peak, "used_peak": used_peak, "throughput": rows, "breakdown": breakdown,
            "remat": remat_table, "proof": (policy, length, seconds, loss),
            "heads": head_table}


if __name__ == "__main__":
    main()
