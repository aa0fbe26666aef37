"""`TransformerConfig`: the hyper-parameters shared by every kexue model, validated once.

Models take this frozen dataclass (`kexue.models.ModelSpec` builds it from a flat
mapping of settings). Every check raises a `ValueError` that names the field, what
was expected and what was given, before any parameter is created.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kexue.ops._checks import check_int, check_number

ACTIVATIONS = ("gelu", "gelu_erf", "relu", "silu", "geglu", "swiglu")
GATED_ACTIVATIONS = ("geglu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ROPE_LAYOUTS = ("interleaved", "half")
ATTENTION_SCALES = ("standard", "entropy_invariant")
DTYPES = ("float32", "bfloat16", "float16")
#: `ops.dot_product_attention` implementations: None (per backend, see
#: `ops.attention.default_implementation`), "xla", "cudnn" (GPU only), "blocked".
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")
#: Rematerialisation policies of `TransformerConfig.remat` (see its docstring).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def argument_error(name: str, expected: str, got: Any) -> ValueError:
    """A `ValueError` of the one shape used for every bad setting: "`name`: expected …"."""
    return ValueError(f"`{name}`: expected {expected}; got {got!r}.")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise argument_error(key, f"one of {list(choices)}", value)


def check_positive_int(key: str, value: Any, *, allow_zero: bool = False) -> None:
    check_int(key, value, least=0 if allow_zero else 1)


def check_no_embedding_tables(config: TransformerConfig, model: str) -> None:
    """Models other than the RoFormer encoders take no position / token-type tables."""
    for key in ("max_positions", "type_vocab_size"):
        if getattr(config, key):
            raise argument_error(key, f"0 for model {model!r} (learned position and "
                               "token-type tables belong to the RoFormer encoder models)",
                               getattr(config, key))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Width, depth, attention and feed-forward choices of a transformer stack.

    Attributes:
      width: model (embedding) width `D`.
      num_layers: number of transformer blocks `L`.
      num_heads: query heads `h`; must divide `width` (head dim `d = D / h`).
      num_kv_heads: key/value heads `h_kv` (grouped-query attention); must divide
        `num_heads`. None means `num_heads` (multi-head attention).
      mlp_dim: hidden width `F` of the feed-forward network.
      vocab_size: token vocabulary `V` (0 for models without token inputs, e.g. ViT).
      activation: ``"gelu" | "gelu_erf" | "relu" | "silu"`` (plain FFN
        `W_2 act(W_1 x)`) or ``"geglu" | "swiglu"`` (gated: `W_2 (act(W_1 x) ⊙ W_g x)`,
        GLU-style). ``"gelu"`` is the tanh approximation
        `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, ``"gelu_erf"`` the exact `x·Φ(x)`
        (what BERT / RoFormer checkpoints call "gelu"; Hendrycks & Gimpel, 2016).
      norm: ``"layernorm" | "rmsnorm"``.
      norm_position: ``"pre"`` (norm inside the residual branch, final norm after the
        stack) or ``"post"`` (norm after each residual sum, norm on the embeddings;
        the original RoFormer / BERT arrangement).
      norm_epsilon: epsilon of the norms.
      use_bias: biases in the attention and FFN projections.
      rope_layout: ``"interleaved"`` (RoFormer) or ``"half"`` (GPT-NeoX / LLaMA).
      rope_base: RoPE frequency base.
      rotary_dim: rotating features per head (partial rotary); None means all `d`,
        0 turns RoPE off (e.g. BERT, whose positions come from `max_positions`).
      rope_dims: number of position axes: 1 for sequences, 2 for image patches.
      attention_scale: ``"standard"`` (`1/√d`) or ``"entropy_invariant"``
        (`log_b(n)/√d`, kexue.fm/archives/8823).
      entropy_base: `b` of the entropy-invariant scale.
      max_positions: rows of a learned absolute position-embedding table added to the
        token embeddings (BERT); 0: none. Sequences may then be at most this long.
      type_vocab_size: rows of a token-type (segment) embedding table added to the
        token embeddings (BERT / RoFormer checkpoints have 2); 0: none.
      attention_implementation: the `implementation` of `ops.dot_product_attention`:
        ``"blocked"`` (kexue's blocked attention: memory linear in the length, causal
        blocks above the diagonal skipped), ``"xla"`` or ``"cudnn"`` (fused cuDNN
        flash attention; NVIDIA GPUs, bf16/fp16 compute only), or None: blocked on CPU
        from `ops.attention.CPU_BLOCKED_MIN_KEYS` keys on (where it is faster), XLA's
        choice elsewhere.
      attention_block_q, attention_block_k: query / key block sizes of the blocked
        implementation; None means the op's defaults.
      dropout_rate: dropout on the embeddings and on each residual branch.
      dtype: compute dtype of matmuls (``"float32"`` or ``"bfloat16"``); norms,
        softmax statistics and returned logits stay float32.
      param_dtype: storage dtype of the parameters.
      init_std: standard deviation of every kernel and embedding at init (biases 0,
        norm scales 1).
      remat: rematerialisation of each transformer block in the backward pass
        (`jax.checkpoint` through `nnx.remat`), trading recompute for activation
        memory: ``"none"`` (keep every activation), ``"full"`` (keep only each block's
        input, recompute the whole block), ``"dots"`` (keep every matmul output,
        attention logits included: `dots_saveable`), ``"dots_no_batch"`` (keep the
        projection and FFN matmul outputs but not the per-head attention logits and
        probabilities, which grow like `n²`: `dots_with_no_batch_dims_saveable`).
        Gradients are unchanged; decoding with a KV cache never rematerialises.
    """

    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    vocab_size: int = 0
    num_kv_heads: int | None = None
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_epsilon: float = 1e-6
    use_bias: bool = True
    rope_layout: str = "interleaved"
    rope_base: float = 10000.0
    rotary_dim: int | None = None
    rope_dims: int = 1
    attention_scale: str = "standard"
    entropy_base: float = 512.0
    max_positions: int = 0
    type_vocab_size: int = 0
    attention_implementation: str | None = None
    attention_block_q: int | None = None
    attention_block_k: int | None = None
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: str = "none"

    def __post_init__(self) -> None:
        for key in ("width", "num_layers", "num_heads", "mlp_dim", "rope_dims"):
            check_positive_int(key, getattr(self, key))
        for key in ("vocab_size", "max_positions", "type_vocab_size"):
            check_positive_int(key, getattr(self, key), allow_zero=True)
        if self.width % self.num_heads:
            raise argument_error(
                "num_heads", f"a divisor of `width` = {self.width}", self.num_heads)
        if self.num_kv_heads is not None:
            check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise argument_error(
                    "num_kv_heads", f"a divisor of `num_heads` = {self.num_heads}",
                    self.num_kv_heads)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        check_choice("attention_scale", self.attention_scale, ATTENTION_SCALES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("param_dtype", self.param_dtype, DTYPES)
        check_choice("remat", self.remat, REMAT_POLICIES)
        check_choice("attention_implementation", self.attention_implementation,
                     ATTENTION_IMPLEMENTATIONS)
        if self.attention_implementation == "cudnn" and self.dtype == "float32":
            raise argument_error("attention_implementation", "'cudnn' only with `dtype` "
                               "'bfloat16' or 'float16' (cuDNN's fused attention)",
                               f"cudnn with dtype {self.dtype}")
        for key in ("attention_block_q", "attention_block_k"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key))
                if self.attention_implementation in ("xla", "cudnn"):
                    raise argument_error(key, "None unless `attention_implementation` is "
                                         "'blocked' or None", getattr(self, key))
        if self.rotary_dim is not None:
            check_positive_int("rotary_dim", self.rotary_dim, allow_zero=True)
        step = 2 * self.rope_dims
        if self.rotary_features % step or self.rotary_features > self.head_dim:
            raise argument_error(
                "rotary_dim",
                f"0 or a multiple of 2·rope_dims = {step} that is at most the head dim "
                f"width / num_heads = {self.head_dim}",
                self.rotary_dim if self.rotary_dim is not None else self.head_dim)
        if not self.rope_base > 1:
            raise argument_error("rope_base", "a number greater than 1", self.rope_base)
        if not self.entropy_base > 1:
            raise argument_error("entropy_base", "a number greater than 1", self.entropy_base)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise argument_error("dropout_rate", "a number in [0, 1)", self.dropout_rate)
        check_number("init_std", self.init_std)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rotary_features(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


TRANSFORMER_KEYS = tuple(field.name for field in dataclasses.fields(TransformerConfig))
