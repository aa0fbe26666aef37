"""RoFormer MLM training step: kexue (JAX) against Hugging Face Transformers (PyTorch).

    python -m benchmarks.peers                 # the two configs below, 10 repeats
    python -m benchmarks.peers --quick         # a tiny config (torch.compile alone takes minutes)
    python -m benchmarks.peers --repeats 20 --no-compile
    python -m benchmarks.peers --no-torch --heads masked --configs a   # kexue alone
    python -m benchmarks.peers --dots          # also each config's matmul shapes alone
    python -m benchmarks.peers --kexue-dtype bfloat16   # kexue's matmuls in bf16

Needs the `peers` extra (`pip install -e '.[peers]'`: torch and transformers).

One training step — forward, masked-LM cross-entropy over the masked positions,
backward, AdamW update, all float32 — of the same architecture on both sides:

* kexue: `kexue.models.build_model` (``roformer_mlm``: post-norm LayerNorm with an
  embedding LayerNorm, tanh-GELU, interleaved RoPE on `q` and `k`, tied output
  embedding plus an output bias, MLM transform dense → GELU → LayerNorm), the state
  from `kexue.train.create_train_state` and the step from `kexue.train.make_train_step`
  (jitted, state donated, `kexue.optim.CPU_COMPILER_OPTIONS` on CPU), `optax.adamw`;
  the step also computes the gradient norm and the non-finite guard, as every kexue
  training run does.
* PyTorch: `transformers.RoFormerForMaskedLM` with `hidden_act="gelu_new"` (tanh
  GELU, as `jax.nn.gelu`), `type_vocab_size=1`, LayerNorm epsilon 1e-12 on both sides,
  `labels` = −100 off the masked positions (its own cross-entropy), `torch.optim.AdamW`
  (its fastest CPU variant, `fused=True`), eager; and the same wrapped in
  `torch.compile` (Inductor), when it compiles.

Dropout is 0 on both sides (kexue has no attention-probability dropout; HF's is set
to 0 too). The loss is at the masked positions (15% of the tokens, `[MASK]` = id 1);
token ids are uniform over `[2, vocab)`, one fixed batch, vocabulary 21128 (the
BERT-Chinese / RoFormer-Chinese vocabulary size). Each side runs its MLM head two ways:

* "all positions": the vocabulary logits at every position (what
  `RoFormerForMaskedLM(labels=...)` does, and kexue without `data.mlm_max_predictions`);
* "masked positions": the head (transform, LayerNorm, vocabulary projection) at the
  masked positions only — kexue's `RoFormerMLM(..., predict_positions=...)`, which
  training uses with `data.mlm_max_predictions`; on the PyTorch side the same gather
  written by hand around HF's modules (`model.roformer`, then `model.cls` on the
  gathered hidden states), since `RoFormerForMaskedLM` has no such option. The two ways
  give the same loss and gradients (the losses are printed side by side).

Trainable parameters are equal except HF's token-type embedding (`type_vocab_size ×
width`, here one row: a learned vector added to every token), which kexue does not
have; the table prints both counts and checks the difference is exactly that row.

Timings interleave all the steps in one loop (kexue, torch eager, torch.compile, …)
and report medians, so machine load hits all alike; PyTorch gets as many intra-op
threads as the cores JAX's XLA:CPU thread pool uses (the process's CPU affinity).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import interleaved_median_times, machine_description, markdown_table, today
from kexue import data, models, parallel, tasks, train

MASK_ID = 1
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01


@dataclasses.dataclass(frozen=True)
class PeerConfig:
    """One benchmark configuration (shared by both frameworks)."""

    name: str
    layers: int
    width: int
    heads: int
    mlp: int
    seq: int
    batch: int
    vocab: int = 21128
    mask_rate: float = 0.15

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        return (f"{self.name}: L{self.layers} D{self.width} h{self.heads} F{self.mlp} "
                f"n{self.seq} b{self.batch} V{self.vocab}")


CONFIGS = (
    PeerConfig("a", layers=4, width=256, heads=4, mlp=1024, seq=128, batch=16),
    PeerConfig("b", layers=6, width=384, heads=6, mlp=1536, seq=256, batch=8),
)
QUICK = (PeerConfig("tiny", layers=2, width=32, heads=2, mlp=64, seq=16, batch=4, vocab=97),)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_batch(cfg: PeerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic MLM batch: `tokens` (masked inputs), `labels`, `weights` (1 where masked)."""
    rng = np.random.default_rng(seed)
    original = rng.integers(2, cfg.vocab, size=(cfg.batch, cfg.seq), dtype=np.int32)
    masked = max(1, round(cfg.mask_rate * cfg.seq))
    weights = np.zeros((cfg.batch, cfg.seq), np.float32)
    for row in weights:
        row[rng.choice(cfg.seq, masked, replace=False)] = 1.0
    tokens = np.where(weights > 0, MASK_ID, original).astype(np.int32)
    return {"tokens": tokens, "labels": original, "weights": weights,
            "valid": np.ones(tokens.shape, bool)}


# --------------------------------------------------------------------------- kexue


def kexue_model_spec(cfg: PeerConfig, **overrides: Any) -> models.ModelSpec:
    """The kexue side's model."""
    return models.ModelSpec.from_settings({
        "name": "roformer_mlm", "width": cfg.width, "num_layers": cfg.layers,
        "num_heads": cfg.heads, "mlp_dim": cfg.mlp, "vocab_size": cfg.vocab,
        "activation": "gelu", "norm": "layernorm", "norm_position": "post",
        "norm_epsilon": 1e-12, "use_bias": True, "rope_layout": "interleaved",
        "attention_scale": "standard", "dropout_rate": 0.0, "init_std": 0.02,
        "tie_embeddings": True, **overrides,
    })


def with_predict_positions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` plus `predict_positions` / `predict_weights` (every row has as many masks)."""
    chosen = batch["weights"] > 0
    return {**batch, **data.prediction_list(chosen, int(chosen.sum(-1).max()))}


class KexueSide:
    """kexue's RoFormer MLM and its jitted, donating AdamW training step on one device."""

    def __init__(self, cfg: PeerConfig, batch: dict[str, np.ndarray], *, seed: int = 0,
                 masked_only: bool = False, dtype: str = "float32",
                 attention_implementation: str | None = None):
        spec = kexue_model_spec(cfg, dtype=dtype,
                                attention_implementation=attention_implementation)
        # The MLM objective of `kexue.tasks`: the head runs at every position, or at the
        # listed masked ones only when the batch carries `predict_positions`.
        loss_fn = tasks.MLMTask(eval_lengths=(cfg.seq,)).loss
        if masked_only:
            batch = with_predict_positions(batch)
        mesh = parallel.make_mesh(devices=jax.devices()[:1])
        tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

        def build() -> nnx.Module:
            return models.build_model(spec, rngs=nnx.Rngs(seed))

        self.state = train.create_train_state(build, tx, mesh, seed=seed)
        self.params = models.count_params(self.state.model())
        abstract = train.abstract_train_state(build, tx, mesh, seed=seed)
        self.step_fn = train.make_train_step(loss_fn, tx, abstract, mesh,
                                             compiler_options=train.cpu_compiler_options(mesh))
        self.batch = parallel.shard_batch(
            {k: jnp.asarray(v) for k, v in batch.items()}, mesh)

    def step(self) -> jax.Array:
        self.state, metrics = self.step_fn(self.state, self.batch)
        return metrics["loss"]


# --------------------------------------------------------------------------- torch


def torch_available() -> str | None:
    """None when torch and transformers import, else the reason they do not."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as error:
        return f"torch/transformers not importable ({type(error).__name__}: {error})"
    return None


def hf_roformer(cfg: PeerConfig, *, seed: int = 0):
    """`transformers.RoFormerForMaskedLM` of the same architecture as `kexue_model_spec`."""
    import torch
    import transformers

    config = transformers.RoFormerConfig(
        vocab_size=cfg.vocab, embedding_size=cfg.width, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp, hidden_act="gelu_new", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=max(cfg.seq, 16),
        type_vocab_size=1, initializer_range=0.02, layer_norm_eps=1e-12,
        rotary_value=False, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.RoFormerForMaskedLM(config)
    model.train()
    return model


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def copy_hf_weights(kexue_model: nnx.Module, hf_model) -> None:
    """Loads the weights of an HF `RoFormerForMaskedLM` into a kexue `RoFormerMLM`.

    HF's token-type row is added to every token's embedding before the embedding
    LayerNorm; kexue has no such row, so it must be zero for the two to agree.
    """
    def arr(tensor) -> jax.Array:
        return jnp.asarray(tensor.detach().cpu().numpy())

    def put(variable, value: jax.Array) -> None:
        variable.set_value(value.reshape(variable.get_value().shape))

    def dense(target, linear) -> None:
        put(target.kernel, arr(linear.weight).T)  # torch stores [out, in]
        put(target.bias, arr(linear.bias))

    def norm(target, layer_norm) -> None:
        put(target.scale, arr(layer_norm.weight))
        put(target.bias, arr(layer_norm.bias))

    hf, enc = hf_model.roformer, kexue_model.encoder
    put(enc.embed.embedding, arr(hf.embeddings.word_embeddings.weight))
    norm(enc.transformer.norm, hf.embeddings.LayerNorm)
    for block, layer in zip(enc.transformer.blocks, hf.encoder.layer, strict=True):
        attention = layer.attention
        dense(block.attention.query, attention.self.query)
        dense(block.attention.key, attention.self.key)
        dense(block.attention.value, attention.self.value)
        dense(block.attention.out, attention.output.dense)
        norm(block.attention_norm, attention.output.LayerNorm)
        dense(block.ffn.wi, layer.intermediate.dense)
        dense(block.ffn.wo, layer.output.dense)
        norm(block.ffn_norm, layer.output.LayerNorm)
    head = hf_model.cls.predictions
    dense(kexue_model.transform, head.transform.dense)
    norm(kexue_model.transform_norm, head.transform.LayerNorm)
    put(kexue_model.output_bias, arr(head.bias))


def max_logit_difference(cfg: PeerConfig, batch: dict[str, np.ndarray]) -> float:
    """Largest |logit difference| of the two models on `batch` with HF's weights in both.

    HF's token-type row is zeroed first (kexue has none); everything else — RoPE
    layout and frequencies, post-norm, tanh GELU, head, tied output — must agree.
    """
    import torch

    hf_model = hf_roformer(cfg)
    with torch.no_grad():
        hf_model.roformer.embeddings.token_type_embeddings.weight.zero_()
        hf_logits = hf_model(input_ids=torch.from_numpy(batch["tokens"].astype(np.int64))
                             ).logits.numpy()
    kexue_model = models.build_model(kexue_model_spec(cfg), rngs=nnx.Rngs(0))
    copy_hf_weights(kexue_model, hf_model)
    kexue_logits = np.asarray(jax.jit(lambda m, t: m(t))(kexue_model, batch["tokens"]))
    return float(np.max(np.abs(kexue_logits - hf_logits)))


class TorchSide:
    """HF `RoFormerForMaskedLM` + `torch.optim.AdamW`, eager or under `torch.compile`.

    `device` is a torch device ("cpu", "cuda"); `autocast` None runs float32, a dtype
    name ("bfloat16") runs the forward and loss under `torch.autocast` in that dtype
    (parameters and optimizer stay float32: the usual mixed precision)."""

    def __init__(self, cfg: PeerConfig, batch: dict[str, np.ndarray], *, compiled: bool,
                 seed: int = 0, masked_only: bool = False, device: str = "cpu",
                 autocast: str | None = None):
        import torch

        self.device = torch.device(device)
        self.autocast = None if autocast is None else getattr(torch, autocast)
        self.model = hf_roformer(cfg, seed=seed).to(self.device)
        self.params = trainable_params(self.model)
        self.type_vocab_params = self.model.roformer.embeddings.token_type_embeddings.weight.numel()
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE,
                                               weight_decay=WEIGHT_DECAY, fused=True)
            self.optimizer_kind = "fused"
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE,
                                               weight_decay=WEIGHT_DECAY)
            self.optimizer_kind = "default"
        def tensor(array: np.ndarray):
            return torch.from_numpy(array).to(self.device)

        self.input_ids = tensor(batch["tokens"].astype(np.int64))
        self.labels = tensor(
            np.where(batch["weights"] > 0, batch["labels"], -100).astype(np.int64))
        rows, cols = np.nonzero(batch["weights"] > 0)
        self.rows, self.cols = tensor(rows), tensor(cols)
        self.targets = tensor(batch["labels"][rows, cols].astype(np.int64))
        loss_fn = self._masked_positions_loss if masked_only else self._loss
        self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.autocast,
                              enabled=self.autocast is not None)

    def _loss(self):
        with self._autocast():
            return self.model(input_ids=self.input_ids, labels=self.labels).loss

    def _masked_positions_loss(self):
        """HF's encoder, then HF's MLM head on the hidden states of the masked tokens."""
        import torch

        with self._autocast():
            hidden = self.model.roformer(input_ids=self.input_ids).last_hidden_state
            logits = self.model.cls(hidden[self.rows, self.cols])
            return torch.nn.functional.cross_entropy(logits, self.targets)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


# --------------------------------------------------------------------------- driver


HEADS = ("all", "masked")  # the MLM head at every position / at the masked ones only
_HEAD_SUFFIX = {"all": "", "masked": " masked"}


@dataclasses.dataclass
class Result:
    """One config's numbers; `ms`, `first_step_s` and `losses` are keyed by side name:
    "kexue", "torch eager", "torch.compile", each with " masked" appended for the head
    at the masked positions only."""

    cfg: PeerConfig
    kexue_params: int
    torch_params: int | None = None
    type_vocab_params: int = 0
    ms: dict[str, float] = dataclasses.field(default_factory=dict)
    compile_note: str = ""
    max_logit_diff: float = math.nan
    first_step_s: dict[str, float] = dataclasses.field(default_factory=dict)
    losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def time(self, side: str, head: str = "all") -> float:
        return self.ms.get(side + _HEAD_SUFFIX[head], math.nan)


def _first_steps(name: str, step: Callable[[], Any], count: int, result: Result) -> None:
    """Runs `count` steps (the first compiles), recording the losses and the first step time."""
    losses = []
    start = time.perf_counter()
    for i in range(count):
        losses.append(float(jax.block_until_ready(step())))
        if i == 0:
            result.first_step_s[name] = time.perf_counter() - start
    result.losses[name] = losses


def run_config(cfg: PeerConfig, *, repeats: int, check_steps: int = 3, use_torch: bool = True,
               use_compile: bool = True, threads: int | None = None,
               heads: tuple[str, ...] = HEADS, kexue_dtype: str = "float32",
               kexue_attention: str | None = None, torch_device: str = "cpu",
               torch_autocast: str | None = None, compile_heads: tuple[str, ...] = HEADS,
               check_logits: bool = True) -> Result:
    """Builds every side for `cfg`, checks losses over `check_steps` steps, times the steps.

    `kexue_dtype` is kexue's `model.dtype` (matmul compute dtype; parameters, norms and
    logits stay float32) and `kexue_attention` its `model.attention_implementation`;
    the PyTorch side runs on `torch_device`, in float32 or under `torch.autocast` in
    `torch_autocast`. `torch.compile` runs for the heads in `compile_heads` only (each
    is a separate compilation). `check_logits` compares the two models' logits with the
    same weights (float32, on the CPU side of torch) first."""
    if not heads or any(head not in HEADS for head in heads):
        raise ValueError(f"heads: expected a non-empty subset of {HEADS}, got {heads!r}")
    batch = make_batch(cfg)
    steps: dict[str, Callable[[], Any]] = {}
    result = None
    for head in heads:
        side = KexueSide(cfg, batch, masked_only=head == "masked", dtype=kexue_dtype,
                         attention_implementation=kexue_attention)
        result = result or Result(cfg, side.params)
        steps["kexue" + _HEAD_SUFFIX[head]] = side.step
    if use_torch:
        import torch

        torch.set_num_threads(threads or cpu_cores())
        if check_logits:
            result.max_logit_diff = max_logit_difference(cfg, batch)
        kinds = [("torch eager", False)] + ([("torch.compile", True)] if use_compile else [])
        if not use_compile:
            result.compile_note = "torch.compile not run"
        for (name, compiled), head in itertools.product(kinds, heads):
            if compiled and head not in compile_heads:
                continue
            key = name + _HEAD_SUFFIX[head]
            try:
                side = TorchSide(cfg, batch, compiled=compiled, masked_only=head == "masked",
                                 device=torch_device, autocast=torch_autocast)
                if compiled:  # compilation happens in the first steps: fail here, not later
                    _first_steps(key, side.step, check_steps, result)
            except Exception as error:
                if not compiled:
                    raise
                note = f"torch.compile ({head} positions) failed: {type(error).__name__}: {error}"
                result.compile_note = note.splitlines()[0][:300]
                continue
            result.torch_params, result.type_vocab_params = side.params, side.type_vocab_params
            steps[key] = side.step
    for key, step in steps.items():
        if key not in result.losses:
            _first_steps(key, step, check_steps, result)
    times = interleaved_median_times(list(steps.values()), repeats=repeats, warmup=1)
    result.ms = {key: 1e3 * t for key, t in zip(steps, times, strict=True)}
    return result


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}"


def _ratio(peer: float, ours: float) -> str:
    return "—" if math.isnan(peer) or math.isnan(ours) else f"{peer / ours:.2f}x"


def _tokens(cfg: PeerConfig, ms: float) -> str:
    return "—" if math.isnan(ms) else f"{cfg.tokens / (ms / 1e3):,.0f}"


RESULTS_HEADER = ["config", "MLM head at", "params kexue / HF", "kexue ms/step",
                  "torch eager ms/step", "torch.compile ms/step", "eager / kexue",
                  "compile / kexue", "tokens/s kexue / eager / compile"]


def results_rows(results: list[Result]) -> list[list[str]]:
    """Like against like (`RESULTS_HEADER`): each row compares the sides running the same
    head."""
    rows = []
    for r in results:
        hf = "—" if r.torch_params is None else f"{r.torch_params:,}"
        for head in HEADS:
            ours, eager, compiled = (r.time(side, head)
                                     for side in ("kexue", "torch eager", "torch.compile"))
            if math.isnan(ours):
                continue
            rows.append([r.cfg.describe(), f"{head} positions", f"{r.kexue_params:,} / {hf}",
                         _ms(ours), _ms(eager), _ms(compiled), _ratio(eager, ours),
                         _ratio(compiled, ours),
                         " / ".join(_tokens(r.cfg, ms) for ms in (ours, eager, compiled))])
    return rows


def results_table(results: list[Result]) -> str:
    return markdown_table(RESULTS_HEADER, results_rows(results))


PRODUCT_HEADER = ["config", "kexue (masked positions) ms/step",
                  "HF RoFormerForMaskedLM eager ms/step", "HF under torch.compile ms/step",
                  "eager / kexue", "compile / kexue"]


def product_rows(results: list[Result]) -> list[list[str]]:
    """What a user gets (`PRODUCT_HEADER`): kexue's masked-LM training step (head at the
    masked positions, `data.mlm_max_predictions`) against `RoFormerForMaskedLM(labels=...)`
    as shipped."""
    rows = []
    for r in results:
        ours, eager, compiled = (r.time("kexue", "masked"), r.time("torch eager"),
                                 r.time("torch.compile"))
        if math.isnan(ours) or math.isnan(eager):
            continue
        rows.append([r.cfg.describe(), _ms(ours), _ms(eager), _ms(compiled),
                     _ratio(eager, ours), _ratio(compiled, ours)])
    return rows


def product_table(results: list[Result]) -> str:
    rows = product_rows(results)
    return markdown_table(PRODUCT_HEADER, rows) if rows else ""


def check_params(result: Result) -> str:
    """One line on the parameter counts; raises if they differ by more than HF's token-type row."""
    if result.torch_params is None:
        return f"{result.cfg.name}: kexue {result.kexue_params:,} parameters (torch not run)"
    diff = result.torch_params - result.kexue_params
    if diff != result.type_vocab_params:
        raise AssertionError(
            f"{result.cfg.name}: HF has {result.torch_params:,} trainable parameters, kexue "
            f"{result.kexue_params:,}: the difference {diff:,} is not HF's token-type "
            f"embedding ({result.type_vocab_params:,})")
    return (f"{result.cfg.name}: HF {result.torch_params:,} = kexue {result.kexue_params:,} + "
            f"{diff:,} (HF's token-type embedding, 1 x width)")


def loss_lines(result: Result) -> list[str]:
    lines = []
    if not math.isnan(result.max_logit_diff):
        lines.append(f"{result.cfg.name}: same architecture — with HF's weights copied into "
                     f"kexue, max |logit difference| = {result.max_logit_diff:.2e}")
    lines.append(f"{result.cfg.name}: log(V) = {math.log(result.cfg.vocab):.3f}")
    for name, losses in result.losses.items():
        lines.append(f"  {name:21s} first-step {result.first_step_s[name]:7.2f} s; losses "
                     + " ".join(f"{x:.3f}" for x in losses))
    return lines


def dot_shapes(cfg: PeerConfig) -> list[tuple[str, int, int, int]]:
    """`(name, M, K, N)` of the step's float32 matmuls: the FFN's, and the vocabulary
    projection at the masked positions (forward shapes; the gradients reuse them)."""
    tokens, masked = cfg.tokens, cfg.batch * max(1, round(cfg.mask_rate * cfg.seq))
    return [("FFN in", tokens, cfg.width, cfg.mlp), ("FFN out", tokens, cfg.mlp, cfg.width),
            ("vocab (masked)", masked, cfg.width, cfg.vocab)]


def dots_table(cfg: PeerConfig, *, repeats: int, use_torch: bool) -> str:
    """GFLOP/s of each matmul of `dot_shapes(cfg)` alone: XLA (`jnp.dot`, jitted) and,
    when `use_torch`, PyTorch (`torch.matmul`, MKL), interleaved. Compares the kernels
    outside the training step."""
    rows = []
    rng = np.random.default_rng(0)
    for name, m, k, n in dot_shapes(cfg):
        a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in ((m, k), (k, n)))
        dot, xa, xb = jax.jit(jnp.dot), jnp.asarray(a), jnp.asarray(b)
        fns = [lambda dot=dot, xa=xa, xb=xb: dot(xa, xb).block_until_ready()]
        if use_torch:
            import torch

            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            fns.append(lambda ta=ta, tb=tb: torch.matmul(ta, tb))
        times = interleaved_median_times(fns, repeats=repeats, warmup=2)
        rates = [f"{2 * m * k * n / t / 1e9:.3g}" for t in times] + ["—"] * (2 - len(times))
        rows.append([name, f"{m} x {k} x {n}", *rates])
    return markdown_table(["matmul", "M x K x N", "XLA GFLOP/s", "torch GFLOP/s"], rows)


def versions() -> str:
    import flax

    parts = [f"jax {jax.__version__}", f"flax {flax.__version__}", f"optax {optax.__version__}"]
    try:
        import torch
        import transformers

        parts += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    except ImportError:
        parts.append("torch/transformers absent")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per side")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="kexue side only")
    parser.add_argument("--dots", action="store_true",
                        help="also time each config's matmul shapes alone (XLA vs torch)")
    parser.add_argument("--kexue-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="kexue's model.dtype (matmul compute dtype)")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help="comma-separated MLM head variants: all (logits at every "
                             "position), masked (at the masked positions only)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated config names to run (default: all)")
    args = parser.parse_args(argv)
    configs = QUICK if args.quick else CONFIGS
    if args.configs:
        wanted = set(args.configs.split(","))
        configs = tuple(c for c in configs if c.name in wanted)
        if not configs:
            raise ValueError(f"`--configs`: expected names among "
                             f"{[c.name for c in QUICK + CONFIGS]}; got {args.configs!r}")
    heads = tuple(h for h in args.heads.split(",") if h)
    if not heads or any(h not in HEADS for h in heads):
        raise ValueError(f"`--heads`: expected a comma-separated subset of {HEADS}; "
                         f"got {args.heads!r}")
    repeats = args.repeats or (3 if args.quick else 10)
    missing = None if args.no_torch else torch_available()
    threads = cpu_cores()
    print(f"# RoFormer MLM training step: kexue vs HF Transformers (PyTorch) — {today()}\n")
    print(f"machine: {machine_description()}; {platform.processor() or platform.machine()}")
    print(f"versions: {versions()}")
    torch_threads = "not run"
    if missing is None and not args.no_torch:
        import torch

        torch.set_num_threads(threads)
        torch_threads = f"{torch.get_num_threads()} intra-op"
    print(f"threads: XLA:CPU pool over {threads} core(s) (process affinity); torch "
          f"{torch_threads}")
    if missing:
        print(f"torch side skipped: {missing}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}")
    print(f"timing: medians of {repeats} interleaved steps; kexue compute {args.kexue_dtype}, "
          f"torch float32; AdamW lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}; dropout 0\n")
    results = []
    for cfg in configs:
        result = run_config(cfg, repeats=repeats, use_torch=missing is None and not args.no_torch,
                            use_compile=not args.no_compile, threads=threads, heads=heads,
                            kexue_dtype=args.kexue_dtype)
        results.append(result)
        print(check_params(result))
        print("\n".join(loss_lines(result)))
        if result.compile_note:
            print(result.compile_note)
        print()
        print(results_table([result]) + "\n", flush=True)
        if args.dots:
            print(f"{cfg.name}: the step's matmuls alone, medians of {repeats} interleaved "
                  "calls\n")
            print(dots_table(cfg, repeats=repeats, use_torch=missing is None
                             and not args.no_torch) + "\n", flush=True)
    print("## All configs, like against like\n")
    print(results_table(results))
    product = product_table(results)
    if product:
        print("\n## kexue's MLM step against RoFormerForMaskedLM as shipped\n")
        print(product)
    return results


if __name__ == "__main__":
    main()
