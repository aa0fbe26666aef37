"""The ``speed`` part of `benchmarks.accelerator`: throughput, MFU, peers, longest length.

Sections, most valuable first (each is saved as it ends):

1. **Peak**: the measured bf16 matmul rate (`benchmarks.lm.matmul_peak`; float32 on
   CPU) and the device's nominal dense bf16 peak (`benchmarks.lm.nominal_peak`).
2. **~124M causal LM**: `benchmarks.lm.throughput` of the GPT-2-small-shaped model
   (`lm.gpt_125m`: bf16 compute, cuDNN attention on GPU) at batch 16 × 1024 with
   AdamW, Amos and Amos-style (Adam direction): step time, tokens/s, MFU against the
   measured and the nominal peak.
3. **Peers**: `benchmarks.peers.run_config` at 12 layers × 768, sequence 512, batch 32
   (vocabulary 21128): kexue's RoFormer MLM step (bf16 compute, cuDNN attention)
   against Hugging Face's PyTorch `RoFormerForMaskedLM` on the GPU under bf16
   autocast (both: float32 parameters and AdamW), eager and `torch.compile` (the latter
   for the all-positions head, one compilation), like for like, and kexue's
   masked-positions head against HF as shipped.
4. **~350M causal LM**: GPT-2-medium-shaped (`lm.gpt_350m`), AdamW, batch 16 × 1024.
5. **Longest length**: the longest power-of-two length (2048 … 16384) whose compiled
   AdamW step of the ~124M model at batch 1 fits 90% of the device memory JAX may use
   (`lm.max_length`, bisected, compile only), with `remat="none"` and `"full"`, then one
   real step at each length found.

With `--smoke` every section runs on toy sizes (the peers' PyTorch side eager only, for
the head at every position, and only where torch imports; no `torch.compile`, which
takes minutes on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import lm, peers
from benchmarks.accelerator import PartReport, Section

GIB = 2**30


def rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


@dataclasses.dataclass(frozen=True)
class Sizes:
    peak_sizes: tuple[int, ...]
    peak_repeats: int
    repeats: int
    small: lm.LMCase
    medium: lm.LMCase
    peer: peers.PeerConfig
    length_model: dict[str, Any]
    length_start: int
    length_limit: int


def full_sizes() -> Sizes:
    return Sizes(
        peak_sizes=(4096, 8192), peak_repeats=5, repeats=10,
        small=lm.LMCase("~124M GPT (D 768, L 12, bf16)", lm.gpt_125m(), 16, 1024),
        medium=lm.LMCase("~350M GPT (D 1024, L 24, bf16)", lm.gpt_350m(), 16, 1024),
        peer=peers.PeerConfig("gpu", layers=12, width=768, heads=12, mlp=3072, seq=512,
                              batch=32),
        length_model=lm.gpt_125m(), length_start=2048, length_limit=16384)


def smoke_sizes() -> Sizes:
    """Toy sizes: one 1-layer model serves both LM sections (its AdamW step compiles
    once; the second is read from the compilation cache) and the length search tries
    16 and 32."""
    (tiny,) = lm.quick_cases()
    shallow = lm.LMCase("tiny (D 64, L 1)", {**tiny.model, "num_layers": 1}, 4, 32)
    return Sizes(peak_sizes=(64, 128), peak_repeats=2, repeats=2, small=shallow,
                 medium=shallow, peer=peers.QUICK[0], length_model=shallow.model,
                 length_start=16, length_limit=32)


def run(report: PartReport) -> None:
    sizes = smoke_sizes() if report.smoke else full_sizes()
    with report.section("peak", "Measured matmul peak") as section:
        peak, peak_size = peak_section(section, sizes)
    with report.section("lm_124m", "~124M causal LM: AdamW, Amos, Amos-style") as section:
        throughput_section(section, sizes.small, ("adamw", "amos", "amos_style"), peak,
                           peak_size, sizes.repeats)
    with report.section("peers", "RoFormer MLM step against Hugging Face PyTorch") as section:
        peers_section(section, sizes, report.smoke)
    with report.section("lm_350m", "~350M causal LM") as section:
        throughput_section(section, sizes.medium, ("adamw",), peak, peak_size, sizes.repeats)
    with report.section("length", "Longest trainable length at batch 1") as section:
        length_section(section, sizes, report)


# ----------------------------------------------------------------------------- sections


def peak_section(section: Section, sizes: Sizes) -> tuple[float, int]:
    peak, peak_size, rows = lm.matmul_peak(sizes.peak_sizes, repeats=sizes.peak_repeats)
    dtype = jnp.dtype(lm.peak_dtype()).name
    section.table(["size", "time (ms)", "GFLOP/s"], rows, title=f"{dtype} `jnp.dot`")
    nominal = lm.nominal_peak()
    section.data.update(measured_flops=peak, size=peak_size, dtype=dtype,
                        nominal_flops=None if nominal is None else nominal[1])
    section.note(f"Measured peak: {rate(peak)} ({dtype}, {peak_size}³). Nominal dense bf16 "
                 "peak: " + ("unknown for this device." if nominal is None else
                             f"{rate(nominal[1])} ({nominal[0]})."))
    return peak, peak_size


def throughput_section(section: Section, case: lm.LMCase, optimizers: tuple[str, ...],
                       peak: float, peak_size: int, repeats: int) -> None:
    measured, used_peak = lm.throughput([case], optimizers, peak, peak_size, repeats=repeats)
    nominal = lm.nominal_peak()
    rows = []
    for t in measured:
        of_nominal = "—" if nominal is None else f"{t.achieved / nominal[1]:.0%}"
        rows.append([*lm.throughput_row(t, used_peak), of_nominal])
        section.data.setdefault("runs", []).append(
            {"optimizer": t.optimizer, "params": t.params, "step_s": t.seconds,
             "tokens_per_s": t.tokens_per_s, "model_flops_per_s": t.achieved,
             "mfu_measured_peak": t.achieved / used_peak,
             "mfu_nominal_peak": None if nominal is None else t.achieved / nominal[1]})
    section.data["peak_used"] = used_peak
    section.table([*lm.THROUGHPUT_HEADER, "MFU (of nominal peak)"], rows)
    section.note(f"The product train step (`kexue.train.make_train_step`), medians of "
                 f"{repeats} interleaved steps; model FLOPs `kexue.models.flops_per_token`; "
                 f"MFU against the measured peak re-timed in the same loop "
                 f"({rate(used_peak)}).")


def peers_section(section: Section, sizes: Sizes, smoke: bool) -> None:
    missing = peers.torch_available()
    gpu = jax.default_backend() == "gpu"
    if missing is not None:
        section.note(f"PyTorch side not run: {missing}.")
    cuda = False
    if missing is None:
        import torch

        cuda = torch.cuda.is_available()
    use_torch = missing is None and (cuda or smoke)
    if missing is None and not use_torch:
        section.note("PyTorch side not run: torch sees no CUDA device (full size needs one).")
    # --smoke: the head at every position only, no torch.compile (minutes on CPU) and no
    # logit comparison (tests/benchmarks/test_peers.py checks both heads and the logits).
    result = peers.run_config(
        sizes.peer, repeats=sizes.repeats, use_torch=use_torch, use_compile=not smoke,
        heads=("all",) if smoke else peers.HEADS, compile_heads=("all",),
        kexue_dtype="bfloat16", kexue_attention="cudnn" if gpu else None,
        torch_device="cuda" if cuda else "cpu", torch_autocast="bfloat16", check_logits=False)
    if smoke and use_torch:
        section.note("--smoke: torch.compile not run (it compiles for minutes on CPU); the "
                     "head at every position only.")
    elif result.compile_note:
        section.note(result.compile_note)
    section.note(peers.check_params(result))
    if result.max_logit_diff == result.max_logit_diff:  # not NaN: the logits were compared
        section.note(f"Same architecture: with HF's weights copied into kexue, max |logit "
                     f"difference| = {result.max_logit_diff:.2e}.")
    section.note(f"Both sides in mixed precision: kexue bf16 compute "
                 f"({'cuDNN' if gpu else 'XLA'} attention), PyTorch under bf16 autocast on "
                 f"{'CUDA' if cuda else 'CPU'}; parameters and AdamW float32; medians of "
                 f"{sizes.repeats} interleaved steps.")
    section.data.update(ms=result.ms, losses=result.losses, first_step_s=result.first_step_s)
    section.table(["side", "first step s (compiles)", "losses of the first steps"],
                  [[side, f"{result.first_step_s[side]:.2f}",
                    " ".join(f"{x:.3f}" for x in losses)]
                   for side, losses in result.losses.items()],
                  title=f"Losses (log V = {math.log(sizes.peer.vocab):.3f} at init)")
    section.table(peers.RESULTS_HEADER, peers.results_rows([result]), title="Like for like")
    product = peers.product_rows([result])
    if product:
        section.table(peers.PRODUCT_HEADER, product,
                      title="kexue's masked-positions head against RoFormerForMaskedLM as "
                            "shipped")


def memory_budget(smoke: bool) -> int:
    """Bytes a compiled step may take: 90% of the device's allocator limit; 1.5 MiB in
    --smoke (about what the toy model takes at its longest length), 1 GiB where the
    backend reports no limit (CPU)."""
    if smoke:
        return 3 * 2**19
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return GIB
    return int(0.9 * stats["bytes_limit"])


def length_section(section: Section, sizes: Sizes, report: PartReport) -> None:
    budget = memory_budget(report.smoke)
    options = lm.remat_options()
    rows = []
    for policy in ("none", "full"):
        spec = lm.causal_lm_spec(sizes.length_model, remat=policy)
        # Keep time for the proof steps: stop searching 60 s before the part's budget.
        length, peak, tried = lm.max_length(spec, 1, sizes.length_start,
                                            sizes.length_limit, budget, options,
                                            deadline=report.deadline - 60)
        stopped = time.time() > report.deadline - 60
        if not tried:
            longest = "not searched (time budget spent)"
        elif stopped and length:
            longest = f"≥ {length} (search stopped at the time budget)"
        else:
            longest = f"{length}" + (" (limit)" if length == sizes.length_limit else "")
        proof = ["not run", "—", "—"]
        if length and report.time_left() > 30:
            try:
                seconds, loss = lm.run_one_step(spec, 1, length, options)
                proof = [f"{seconds:.2f}", f"{loss:.3f}", f"{length / seconds:,.0f}"]
            except Exception as error:  # e.g. out of memory although the compile fit
                proof = [section.record_error(f"{policy} step at {length}", error), "—", "—"]
        rows.append([policy, longest, f"{peak / GIB:.2f}",
                     ", ".join(f"{n}: {b / GIB:.2f}" for n, b in tried), *proof])
        section.data.setdefault("policies", {})[policy] = {
            "length": length, "peak_bytes": peak, "tried": tried, "stopped": stopped}
    section.data["budget_bytes"] = budget
    section.note(f"Model: {sizes.length_model['width']} wide, "
                 f"{sizes.length_model['num_layers']} layer(s), attention "
                 f"{sizes.length_model.get('attention_implementation') or 'xla'}; batch 1, "
                 f"AdamW; budget {budget / GIB:.2f} GiB of compiled temp + argument bytes; "
                 f"lengths doubled from {sizes.length_start} to at most "
                 f"{sizes.length_limit}, bisected. One real step runs at each length found. "
                 "The cap: the causal LM's mask is an [n, n] constant of the compiled "
                 "program (n² bytes; 256 MiB at 16384), so compile time and host memory grow "
                 "with n².")
    section.table(["remat", "longest length", "peak GiB", "tried (length: GiB)",
                   "step s (compiled)", "loss", "tokens/s"], rows)
